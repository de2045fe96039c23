"""K-FAC's checkpoint state: plain data (loadable with ``weights_only=True``), validated on load.

``{"version", "steps", "last_inverse_step", "compute_method", "options", "blocks": {name: {"spec",
"factors", "generators"}}}``: per block its use (``UseSpec.to_state``), each factor's running
average and counters (``KroneckerFactor.state_dict``: the decomposition only when it is older than
the value) and its row-sampling generators; ``options`` are the K-FAC options the state was saved
with (``KFACOptions.to_dict()`` with the dtypes in use: strings, numbers, None, lists). States
saved before ``options`` existed load as before, without the comparison.

On load, ``option_differences`` names every option that differs from the saved one, with what the
difference means for the resumed run; blocks whose parameters are now left to the optimizer by
``skip_modules`` are dropped (``SavedState.dropped``), and errors about blocks name the option or
setting that explains them.
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
from lightning_kfac.kfac.options import ComputeMethod, KFACOptions
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
    #: The options it was saved with (None: saved before they were recorded).
    options: dict[str, Any] | None = None
    #: Blocks dropped because ``skip_modules`` now leaves a parameter of theirs to the optimizer.
    dropped: list[str] = dataclasses.field(default_factory=list)


def saved_options(options: KFACOptions, factor_dtype: Any, inverse_dtype: Any) -> dict[str, Any]:
    """What a state records of ``options``: plain values, with the dtypes in use (the options'
    ``None`` means "float32, or the parameters' dtype if wider")."""
    recorded = options.to_dict()
    for name, dtype in (("factor_dtype", factor_dtype), ("inverse_dtype", inverse_dtype)):
        recorded[name] = str(dtype).removeprefix("torch.")
    return recorded


def save(
    steps: int,
    last_inverse_step: int | None,
    method: ComputeMethod,
    blocks: Iterable[Block],
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "steps": steps,
        "last_inverse_step": last_inverse_step,
        "compute_method": str(method),
        **({"options": options} if options is not None else {}),
        "blocks": {
            block.name: {
                "spec": block.spec.to_state(),
                "factors": [factor.state_dict() for factor in block.factors],
                "generators": block.sums.sampler.state(),
            }
            for block in blocks
        },
    }


def parse(
    state: Any,
    tracked: Iterable[str],
    skipped: Mapping[str, str] | None = None,
    names: Iterable[str] = (),
) -> SavedState:
    """Parse a saved state; ``ValueError`` for another format, or a block of another model.

    Args:
        state: What ``save`` returned.
        tracked: The parameters K-FAC preconditions in this run.
        skipped: Trainable parameters ``skip_modules`` leaves to the optimizer in this run (name
            -> reason): their blocks are dropped (``SavedState.dropped``), not an error.
        names: Every parameter name of the model (to tell a frozen parameter from a missing one).
    """
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(
            "K-FAC state of an unknown format (saved by another version of lightning-kfac?); "
            "resume without it to start K-FAC afresh"
        )
    tracked = set(tracked)
    skipped = dict(skipped or {})
    names = set(names)
    options = state.get("options")
    blocks, dropped = [], []
    for name, entry in state["blocks"].items():
        spec = UseSpec.from_state(entry["spec"])
        try:
            kind_named(spec.kind)
        except ValueError as error:
            raise ValueError(f"K-FAC checkpoint: block {name}: {error}") from None
        now_skipped = [part.name for part in spec.parts if part.name in skipped]
        if now_skipped:
            dropped.append(name)
            continue
        for part in spec.parts:
            if part.name in tracked:
                continue
            if part.name in names:
                reason = (
                    "which does not require grad in this run (frozen): unfreeze it before "
                    "resuming, as it was when the checkpoint was saved"
                )
            else:
                reason = "which this model does not have: was the state saved for another model?"
            raise ValueError(f"K-FAC checkpoint: block {name} uses parameter {part.name}, {reason}")
        blocks.append(SavedBlock(name, spec, entry["factors"], entry.get("generators", {})))
    return SavedState(
        int(state["steps"]),
        state["last_inverse_step"],
        state.get("compute_method"),
        blocks,
        options if isinstance(options, dict) else None,
        dropped,
    )


#: What a difference between the saved and the resumed run's value of each option means.
_MEANINGS = {
    "damping": "the steps from here precondition with the new damping (with "
    "compute_method='inverse', decompositions kept from the checkpoint hold the saved one until "
    "the next inverse update)",
    "factor_update_interval": "factors are updated at the steps that are multiples of the new "
    "interval, counted from step 0 (the step counter continues)",
    "inverse_update_interval": "decompositions are recomputed at the steps that are multiples of "
    "the new interval, counted from step 0 (the step counter continues)",
    "factor_decay": "the saved running averages continue with the new decay",
    "kl_clip": "the steps from here are KL-clipped with the new bound (None: not clipped)",
    "lr": "the KL-clip uses the new learning rate (None: the optimizer's)",
    "skip_modules": "parameters of the modules it matches are left to the optimizer; their saved "
    "K-FAC state is dropped, and parameters it no longer matches start with fresh factors",
    "factor_dtype": "the saved factors are converted to the new dtype",
    "inverse_dtype": "decompositions are made (and saved ones converted) in the new dtype",
    "compute_method": "the saved decompositions are dropped and recomputed from the saved "
    "factors with the new method",
    "approximation": "the saved factors were formed with the old approximation; new batches of "
    "the other one are averaged into them",
    "factor_max_rows": "factor batches are estimated from the new number of rows",
    "max_factor_dim": "factor sides above the new size are diagonal; a saved factor of the "
    "other form is rejected",
    "nonfinite_gradients": "non-finite gradients are handled the new way",
    "batch_dim": "the number of samples N comes from another dimension; G is formed with N, so "
    "new batches may be on another scale than the saved factors",
    "distribution_mode": "only memory and communication change, not the result",
    "factor_bucket_cap_mb": "only communication changes, not the result",
}


def option_differences(saved: Mapping[str, Any] | None, now: Mapping[str, Any]) -> list[str]:
    """One message per option whose saved value differs from this run's (``saved_options``
    form: schedules compare by name), saying what the difference means; none without saved
    options (a state saved before they were recorded)."""
    if saved is None:
        return []
    messages = []
    for name, value in now.items():
        if name not in saved:
            continue
        before = saved[name]
        if isinstance(before, list | tuple) and isinstance(value, list | tuple):
            same = list(before) == list(value)
        else:
            same = before == value
        if same:
            continue
        meaning = _MEANINGS.get(name, "the resumed run uses the new value")
        messages.append(
            f"K-FAC checkpoint saved with {name}={_shown(before)}, resumed with "
            f"{name}={_shown(value)}: {meaning}"
        )
    return messages


def _shown(value: Any) -> str:
    return repr(tuple(value)) if isinstance(value, list) else repr(value)


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
