"""K-FAC's checkpoint state: plain data (loadable with ``weights_only=True``), validated on load.

``{"version", "steps", "last_inverse_step", "compute_method", "blocks": {name: {"spec", "factors",
"generators"}}}``: per block its use (``UseSpec.to_state``), each factor's running average and
counters (``KroneckerFactor.state_dict``: the decomposition only when it is older than the value)
and its row-sampling generators.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_kfac.kfac.blocks import Block
from lightning_kfac.kfac.factors import KroneckerFactor
from lightning_kfac.kfac.kinds import UseModel, kind_named
from lightning_kfac.kfac.options import ComputeMethod
from lightning_kfac.kfac.uses import UseSpec

STATE_VERSION = 2


@dataclasses.dataclass
class SavedBlock:
    """One block of a loaded state."""

    name: str
    spec: UseSpec
    factors: list[dict[str, Any]]
    generators: dict[str, Tensor]


@dataclasses.dataclass
class SavedState:
    """A loaded, parsed state."""

    steps: int
    last_inverse_step: int | None
    compute_method: str | None
    blocks: list[SavedBlock]


def save(
    steps: int, last_inverse_step: int | None, method: ComputeMethod, blocks: Iterable[Block]
) -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "steps": steps,
        "last_inverse_step": last_inverse_step,
        "compute_method": str(method),
        "blocks": {
            block.name: {
                "spec": block.spec.to_state(),
                "factors": [factor.state_dict() for factor in block.factors],
                "generators": block.sums.sampler.state(),
            }
            for block in blocks
        },
    }


def parse(state: Any, tracked: Iterable[str]) -> SavedState:
    """Parse a saved state; ``ValueError`` for another format, or a block of another model."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(
            "K-FAC state of an unknown format (saved by another version of lightning-kfac?); "
            "resume without it to start K-FAC afresh"
        )
    tracked = set(tracked)
    blocks = []
    for name, entry in state["blocks"].items():
        spec = UseSpec.from_state(entry["spec"])
        try:
            kind_named(spec.kind)
        except ValueError as error:
            raise ValueError(f"K-FAC checkpoint: block {name}: {error}") from None
        for part in spec.parts:
            if part.name not in tracked:
                raise ValueError(
                    f"K-FAC checkpoint: block {name} uses parameter {part.name}, which this "
                    "model does not train: was the state saved for another model?"
                )
        blocks.append(SavedBlock(name, spec, entry["factors"], entry.get("generators", {})))
    return SavedState(
        int(state["steps"]), state["last_inverse_step"], state.get("compute_method"), blocks
    )


def check_factors(saved: SavedBlock, model: UseModel, dtype: Any) -> None:
    """Validate a saved block's factors against the factors ``model`` has (``ValueError``)."""
    for index, (side, factor_state) in enumerate(
        zip(model.factor_sides, saved.factors, strict=True)
    ):
        factor = KroneckerFactor(
            side.dim,
            side.blocks,
            dtype,
            diagonal=side.diagonal,
            per_block_count=side.per_block_count,
        )
        factor.check_state(factor_state, f"{saved.name}[{index}]")


def restore(
    saved: SavedState,
    blocks: Mapping[UseSpec, Block],
    method: ComputeMethod,
    device_of: Callable[[Block], torch.device],
) -> list[SavedBlock]:
    """Load the saved factors and generators into ``blocks`` (onto ``device_of(block)``); return
    the saved blocks that are not among them.

    Decompositions saved for another ``compute_method`` are dropped (recomputed by the caller).
    """
    same_method = saved.compute_method == str(method)
    missing = []
    for entry in saved.blocks:
        block = blocks.get(entry.spec)
        if block is None:
            missing.append(entry)
            continue
        device = device_of(block)
        for factor, factor_state in zip(block.factors, entry.factors, strict=True):
            if not same_method:
                factor_state = {k: v for k, v in factor_state.items() if k != "decomposition"}
            factor.load_state_dict(factor_state, device)
        block.sums.sampler.load(entry.generators)
    return missing
