"""KFACPreconditioner: K-FAC (Martens & Grosse 2015) for any ``nn.Module``, in plain PyTorch.

Usage::

    pre = KFACPreconditioner(model, damping=1e-3, optimizer=optimizer)
    loss = loss_fn(model(x), y)     # the model's forward marks the micro-batch (N = x.shape[0])
    loss.backward()
    pre.step()                      # rewrites .grad of every preconditioned parameter in place
    optimizer.step()

K-FAC's blocks belong to *uses* of trainable parameters, found by tracing the first training
forward (``tracing``): ``F.linear``-like calls (``nn.Linear``, MHA projections, GPT-2 ``Conv1D``,
tied heads), convolutions, embeddings and normalisation layers. The structure is fixed at the
first ``step()`` (agreed between workers), reported (``coverage_report()``, and a
``KFACCoverageWarning`` naming every parameter left to the optimizer), and traced again when the
set of trainable parameters changes.

Each ``step()`` is one orchestration of five stages (data flows one way):

1. on factor-update steps (``step % factor_update_interval == 0``) the captured sums are reduced
   over workers (weighted by what each captured) and folded into the running averages;
2. on inverse-update steps (``step % inverse_update_interval == 0``) the factors are decomposed,
   same-shaped ones in one batched call;
3. every use's gradient ``dW`` is replaced by ``P = (A ⊗ G + λ I)^-1 vec(dW)`` (unit-wise:
   ``(F + λ I)^-1 u``); a parameter with several uses gets the sum of its uses' ``P``;
4. with ``kl_clip`` set, all ``P`` are scaled by ``ν = min(1, sqrt(κ / Σ lr² <P, dW>)))``;
5. faults (rejected factor batches, failed decompositions, non-finite steps) are reported once.

No stage reads a device value back to the host, except the decompositions themselves (``eigh``
checks convergence) and the fault report on inverse-update steps; choices that depend on values
(a non-finite batch, a non-finite ``P``) are made on the device with ``torch.where``.
"""

from __future__ import annotations

import fnmatch
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kfac.kfac import linalg
from lightning_kfac.kfac.blocks import Block
from lightning_kfac.kfac.capture import UseCapture
from lightning_kfac.kfac.decomposition import decompose_blocks
from lightning_kfac.kfac.distribution import Distributor, LocalDistributor
from lightning_kfac.kfac.options import (
    ComputeMethod,
    KFACOptions,
    NonFiniteGradients,
    SkipSpec,
    evaluate,
)
from lightning_kfac.kfac.structure import Structure, format_table
from lightning_kfac.kfac.tracing import ParameterView
from lightning_kfac.kfac.uses import NormModel, UseSpec

log = logging.getLogger(__name__)

STATE_VERSION = 2


class KFACNumericalWarning(RuntimeWarning):
    """A numerical fault K-FAC recovered from (skipped factor batch, failed decomposition,
    non-finite gradients)."""


class KFACCoverageWarning(UserWarning):
    """Some trainable parameters get no K-FAC step (named in the message, with the reason)."""


class KFACPreconditioner:
    """Kronecker-factored preconditioner for every supported use of a model's parameters.

    Args:
        model: The model. Its training forward delimits micro-batches and is traced to find the
            uses of its trainable parameters.
        options: A ``KFACOptions``; keyword arguments named like its fields override it
            (``KFACPreconditioner(model, damping=1e-2)``). Unknown keywords are rejected with
            the closest option name.
        optimizer: The optimizer that will apply the step; read for its learning rates (KL-clip).
        grad_scaler: An AMP ``GradScaler`` whose loss scale is divided out of the captured output
            gradients.
        distributor: How work is shared among workers; default one worker.
        report: Emit the coverage report (a ``KFACCoverageWarning`` for parameters left to the
            optimizer, and the table at INFO level) when the structure is fixed. A distributed
            runner passes True on one rank only.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        options: KFACOptions | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        distributor: Distributor | None = None,
        report: bool = True,
        **kwargs: Any,
    ) -> None:
        self.options = KFACOptions.from_kwargs(options, **kwargs)
        opts = self.options
        if opts.lr is None and optimizer is None and opts.kl_clip is not None:
            raise ValueError(
                "KL-clip needs a learning rate: pass optimizer=... (its param groups' lr is "
                "used), lr=..., or kl_clip=None"
            )
        self.model = model
        self.optimizer = optimizer
        self.grad_scaler = grad_scaler
        self.distributor: Distributor = distributor or LocalDistributor()
        self.compute_method = ComputeMethod(opts.compute_method)
        #: Multiplier of the backpropagated loss relative to the mean loss of the micro-batch
        #: (e.g. ``1 / accumulate_grad_batches``); the AMP scale is applied on top.
        self.loss_scale: float = 1.0
        #: False disables capture (factors frozen at their current values).
        self.capture_enabled = True
        #: Whether the current backward is the last before ``step()`` (all micro-batches done);
        #: when it is, a block's factors may be reduced as soon as its capture completes.
        self.is_final_backward: Callable[[], bool] | None = None
        #: Number of completed ``step()`` calls.
        self.steps = 0
        self.last_inverse_step: int | None = None
        #: Figures of the last step (``kl_scale``, ``damping``, ``*_time`` in seconds, ...).
        self.last_step_info: dict[str, Any] = {}
        #: Optional ``profile(name)`` context manager factory (e.g. a Lightning profiler's).
        self.profile: Callable[[str], AbstractContextManager[Any]] | None = None
        #: Steps whose raw gradients were not finite (device-side counter, no AMP scaler).
        self.nonfinite_steps: Tensor | None = None
        #: Steps the AMP scaler skips (non-finite scaled gradients; device-side counter).
        self.amp_skipped_steps: Tensor | None = None
        self._report = report
        self._reported: set[str] = set()
        self._nonfinite_results: Tensor | None = None

        parameter_dtype = next((p.dtype for p in model.parameters()), torch.float32)
        widest = torch.promote_types(torch.float32, parameter_dtype)
        self.factor_dtype: torch.dtype = opts.factor_dtype or widest  # type: ignore[assignment]
        self.inverse_dtype: torch.dtype = opts.inverse_dtype or self.factor_dtype  # type: ignore[assignment]

        self.param_order: dict[str, int] = {}
        self.tracked: dict[str, nn.Parameter] = {}
        #: Trainable parameters K-FAC leaves alone by configuration, with the reason.
        self.skipped: dict[str, str] = {}
        self._trainable_ids: set[int] = set()
        self._scan_parameters()
        if not self.tracked:
            raise ValueError(
                "KFACPreconditioner found no trainable parameter to track "
                f"(skipped: {self.skipped or 'none'}); check skip_modules and requires_grad"
            )
        self.capture = UseCapture(
            model,
            list(self.tracked.items()),
            make_block=self._make_block,
            capturing=lambda: self.capturing,
            loss_scale=self._current_loss_scale,
            on_block_complete=self._block_complete,
            on_forward=self._on_forward,
            batch_dim=opts.batch_dim,
        )
        self.structure: Structure | None = None
        #: Blocks of the agreed structure, in order (the same on every worker).
        self.blocks: dict[str, Block] = {}
        self._pending_state: dict[str, Any] | None = None
        self._restructure = True
        self.capture.start_discovery()

    # -- parameters ---------------------------------------------------------------------------
    @staticmethod
    def _matches(name: str, module: nn.Module, specs: tuple[SkipSpec, ...]) -> bool:
        for spec in specs:
            if isinstance(spec, str):
                if fnmatch.fnmatchcase(name, spec) or fnmatch.fnmatchcase(
                    type(module).__name__, spec
                ):
                    return True
            elif isinstance(module, spec):
                return True
        return False

    def _scan_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Track trainable parameters not in ``skip_modules``; return the newly tracked ones."""
        owners: dict[int, list[tuple[str, nn.Module]]] = {}
        for module_name, module in self.model.named_modules(remove_duplicate=False):
            for param in module.parameters(recurse=False):
                owners.setdefault(id(param), []).append((module_name, module))
        new = []
        for index, (name, param) in enumerate(self.model.named_parameters()):
            self.param_order.setdefault(name, index)
            if not param.requires_grad or name in self.tracked:
                continue
            if any(
                self._matches(module_name, module, self.options.skip_modules)  # type: ignore[arg-type]
                for module_name, module in owners.get(id(param), [])
            ):
                self.skipped[name] = "matched skip_modules"
                continue
            self.tracked[name] = param
            new.append((name, param))
        #: Every parameter of the model (walking the module tree each step costs ~1 ms).
        self._parameters = list(self.model.parameters())
        self._trainable_ids = {id(p) for p in self._parameters if p.requires_grad}
        return new

    def _on_forward(self) -> None:
        """Start of a training forward: pick up parameters that became trainable."""
        current = {id(p) for p in self._parameters if p.requires_grad}
        if current == self._trainable_ids:
            return
        new = self._scan_parameters()
        if new:
            self.capture.track(new)
            self.capture.start_discovery()
            self._restructure = True
            names = ", ".join(name for name, _ in new)
            self._warn_once(
                f"trainable:{names}",
                f"K-FAC: parameters became trainable during training ({names}); their uses are "
                "traced in this forward and preconditioned from this step on",
                KFACCoverageWarning,
            )

    # -- blocks -------------------------------------------------------------------------------
    def _batch_dim_hint(self, site: str) -> int | None:
        """The sample dimension of calls made in ``site``, when the model says it: inside
        ``nn.MultiheadAttention`` projections see ``(L, N, E)``; modules under a parent with a
        ``batch_first`` attribute follow it."""
        modules = dict(self.model.named_modules())
        module = modules.get(site)
        if isinstance(module, nn.MultiheadAttention):
            return 1
        parts = site.split(".") if site else []
        for depth in range(len(parts), -1, -1):
            parent = modules.get(".".join(parts[:depth]))
            flag = getattr(parent, "batch_first", None)
            if isinstance(flag, bool):
                return 0 if flag else 1
        return None

    def _make_block(self, spec: UseSpec) -> Block:
        opts = self.options
        return Block(
            "?",
            spec,
            self.capture.make_model(spec, opts.max_factor_dim),
            self.factor_dtype,
            approximation=opts.approximation,  # type: ignore[arg-type]
            max_rows=opts.factor_max_rows,
            seed=len(self.capture.blocks),
            batch_dim=self._batch_dim_hint(spec.site),
        )

    def _spec_key(self, spec: UseSpec) -> tuple[Any, ...]:
        first = spec.parts[0].name
        return (self.param_order.get(first, 1 << 30), spec.site, str(spec.kind), repr(spec))

    def fix_structure(self) -> None:
        """Agree on the uses traced so far (all workers), build the blocks, report coverage.

        ``step()`` calls it on the first step; call it yourself after one training forward to
        see ``coverage_report()`` (or plan communication) before training.
        """
        local = list(self.capture.discovered) + list(self.capture.blocks)
        specs, unsupported = self.distributor.agree_on_uses(
            sorted(dict.fromkeys(local), key=self._spec_key), self.capture.unsupported
        )
        specs = sorted(specs, key=self._spec_key)
        shapes = {name: tuple(p.shape) for name, p in self.model.named_parameters()}
        structure = Structure(
            specs,
            self.tracked,
            unsupported,
            self.skipped,
            lambda spec: self.capture.make_model(spec, self.options.max_factor_dim),
        )
        structure.skipped_shapes(shapes)
        blocks: dict[UseSpec, Block] = {}
        for index, spec in enumerate(structure.kept):
            block = self.capture.blocks.get(spec) or self._make_block(spec)
            block.name = structure.names[spec]
            block.seed = index
            block.alias_parts = structure.alias_parts[spec]
            blocks[spec] = block
        self.blocks = {block.name: block for block in blocks.values()}
        self.structure = structure
        self.capture.set_structure(blocks, [*structure.sites, *self._unseen_owners(specs)])
        self.distributor.setup(list(self.blocks.values()), self.compute_method, self.inverse_dtype)
        self._restructure = False
        if self._pending_state is not None:
            state, self._pending_state = self._pending_state, None
            self._load_block_state(state, checked=True)  # checked in load_state_dict
        if self._report:
            self._emit_coverage(structure)

    def _unseen_owners(self, specs: list[UseSpec]) -> list[str]:
        """Modules owning tracked parameters that no use (supported or not) touched yet: they stay
        traced, so that a use first made later (a branch) is seen and picked up."""
        seen = {part.name for spec in specs for part in spec.parts} | set(self.capture.unsupported)
        owners = []
        for module_name, module in self.model.named_modules():
            for param_name, _ in module.named_parameters(recurse=False):
                full = f"{module_name}.{param_name}" if module_name else param_name
                if module_name and full in self.tracked and full not in seen:
                    owners.append(module_name)
                    break
        return owners

    def _emit_coverage(self, structure: Structure) -> None:
        # The table is for whoever asks (coverage_report(); KFACDDPStrategy prints it on rank 0);
        # what users must not miss is a parameter left to the optimizer: that is a warning.
        log.debug(format_table(structure.reports, structure.preconditioned_fraction))
        left = structure.left_to_optimizer()
        if left:
            listed = "; ".join(f"{r.name} ({r.detail})" for r in left)
            self._warn_once(
                "coverage:" + ",".join(r.name for r in left),
                f"K-FAC preconditions {100 * structure.preconditioned_fraction:.1f} % of the "
                f"trainable parameter elements; left to the optimizer (raw gradient, not "
                f"KL-clipped): {listed}",
                KFACCoverageWarning,
            )

    def coverage_report(self) -> str:
        """The coverage table (after the first step)."""
        if self.structure is None:
            return "K-FAC structure not fixed yet: it is traced in the first training step"
        return format_table(self.structure.reports, self.structure.preconditioned_fraction)

    @property
    def preconditioned_fraction(self) -> float | None:
        return None if self.structure is None else self.structure.preconditioned_fraction

    def remove_hooks(self) -> None:
        """Detach the preconditioner from the model (no further capture)."""
        self.capture.remove()

    # -- capture ---------------------------------------------------------------------------
    @property
    def capturing(self) -> bool:
        """Whether the passes before the coming ``step()`` feed the factors."""
        return self.capture_enabled and self.steps % self.options.factor_update_interval == 0

    def _current_loss_scale(self) -> float | Tensor:
        scale: float | Tensor = self.loss_scale
        scaler = self.grad_scaler
        if scaler is not None and scaler.is_enabled():
            scaler_scale = getattr(scaler, "_scale", None)  # tensor: no host sync
            if not isinstance(scaler_scale, Tensor):
                scaler_scale = scaler.get_scale()
            scale = scaler_scale * scale
        return scale

    def _block_complete(self, block: Block) -> None:
        final = self.is_final_backward
        if self.structure is not None and not self._restructure and final is not None and final():
            self.distributor.factors_ready(block)

    def discard_captured(self) -> None:
        """Drop what the hooks captured since the last step (a step the AMP scaler skips)."""
        for block in self.capture.blocks.values():
            block.discard_capture()
            block.use_gradients.clear()
        if self.structure is not None and not self._restructure:
            # A distributed step still runs its reduction (of zeros for what was dropped here):
            # some buckets may have launched during the backward pass, on every rank.
            self.distributor.discard(list(self.blocks.values()))

    # -- step ------------------------------------------------------------------------------
    def step(self, *, grad_scale: float | Tensor = 1.0) -> None:
        """Update factors / decompositions as scheduled and precondition the gradients in place.

        Args:
            grad_scale: The factor by which ``.grad`` currently exceeds the true gradient (a loss
                scale not yet unscaled). Preconditioning is linear, so only the KL-clip uses it.
        """
        step = self.steps
        self.last_step_info = {}
        if self.capture.training_forwards == 0 and self.structure is None:
            raise RuntimeError(
                "KFACPreconditioner.step() before any training forward of the model it was "
                "built with: K-FAC finds the uses of the parameters by tracing that forward "
                "(model.train(), gradients enabled); call the model itself, not only submodules"
            )
        if self.structure is None or self._restructure:
            self.fix_structure()
        finite = self._check_gradients(grad_scale)
        inverse_step = step % self.options.inverse_update_interval == 0
        if step % self.options.factor_update_interval == 0:
            with self._timed("factors"):
                self.update_factors(accept=finite)
        if inverse_step:
            # Every worker, every inverse step (an agreement, whatever each saw), after the factor
            # reduction has finished (its buckets are launched in different places on each rank).
            self._pick_up_unexpected()
        with self._timed("inverses"):
            # Off-schedule, only blocks whose first factors just arrived or whose decomposition
            # failed last time.
            self.update_decompositions(only_missing=not inverse_step)
        with self._timed("precondition"):
            self.precondition(grad_scale=grad_scale, finite=finite)
        if inverse_step:
            self._report_faults()
        self.steps += 1

    @contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        with self.profile(f"kfac/{stage}") if self.profile is not None else nullcontext():
            yield
        self.last_step_info[f"{stage}_time"] = time.perf_counter() - start

    def _check_gradients(self, grad_scale: float | Tensor) -> Tensor | None:
        """Device-side finiteness of all raw gradients; without an AMP scaler, a non-finite step
        is skipped (gradients zeroed, factors unchanged) or raises, as configured."""
        grads = [p.grad for p in self._parameters if p.grad is not None]
        if not grads:
            return None
        norms = torch._foreach_norm(grads, float("inf"))
        finite = torch.isfinite(torch.stack([n.to(torch.float32) for n in norms])).all()
        scaler = self.grad_scaler
        if scaler is not None and scaler.is_enabled():
            # The scaler skips such steps; K-FAC only keeps its factors (device-side).
            skipped = (~finite).to(torch.int64)
            previous = self.amp_skipped_steps
            self.amp_skipped_steps = skipped if previous is None else previous + skipped
            return finite
        if self.options.nonfinite_gradients == NonFiniteGradients.RAISE:
            if not bool(finite):
                raise FloatingPointError(
                    "K-FAC: the gradients of this step are not finite (nonfinite_gradients="
                    "'raise'); check the inputs and the loss, or use 'skip_step'"
                )
            return finite
        for grad in grads:
            grad.masked_fill_(~finite, 0.0)
        skipped = (~finite).to(torch.int64)
        self.nonfinite_steps = (
            skipped if self.nonfinite_steps is None else self.nonfinite_steps + skipped
        )
        self.last_step_info["nonfinite_skipped_steps"] = self.nonfinite_steps
        return finite

    def update_factors(self, accept: Tensor | None = None) -> None:
        """Reduce the step's sums over workers and fold them into the running averages."""
        decay = evaluate(self.options.factor_decay, self.steps, "factor_decay")
        assert decay is not None
        blocks = list(self.blocks.values())
        for block in self.capture.blocks.values():
            block.finish_capture()
        reduced = self.distributor.reduce_factor_sums(blocks)
        for block, sums in zip(blocks, reduced, strict=True):
            if sums is None:
                continue
            for factor, (total, count) in zip(block.factors, sums, strict=True):
                factor.update(total, count, decay, accept)

    def update_decompositions(self, *, only_missing: bool = False) -> None:
        """Decompose the factors of every block (or only of those without a decomposition)."""
        damping = evaluate(self.options.damping, self.steps, "damping")
        assert damping is not None
        blocks = [
            block
            for block in self.blocks.values()
            if block.has_factors and not (only_missing and block.has_decomposition)
        ]
        if not blocks:
            return

        def decompose(owned: list[Block]) -> None:
            decompose_blocks(owned, self.compute_method, damping, self.inverse_dtype)

        self.distributor.run_decompositions(blocks, decompose)
        for block in blocks:
            outcome = "retry" if block.has_decomposition else "fallback"
            for fault in block.faults:
                self._warn_once(
                    f"decomposition:{block.name}:{outcome}",
                    f"K-FAC decomposition of {block.name} {fault}"
                    + ("" if block.has_decomposition else "; using the raw gradient for it"),
                )
        if not only_missing:
            self.last_inverse_step = self.steps

    def _learning_rates(self) -> dict[int, float]:
        """Learning rate per parameter id: the schedule ``lr`` or the optimizer's param groups."""
        if self.options.lr is not None:
            lr = evaluate(self.options.lr, self.steps, "lr")
            assert lr is not None
            return {id(p): lr for p in self.tracked.values()}
        assert self.optimizer is not None
        return {
            id(p): float(group["lr"])
            for group in self.optimizer.param_groups
            for p in group["params"]
        }

    # -- gradient routes ------------------------------------------------------------------
    def _part_gradient(self, block: Block, role: str, view: ParameterView | None) -> Tensor | None:
        if view is None:
            return None
        if role in block.alias_parts:
            return block.use_gradients.get(role)
        grad = self.tracked[view.name].grad
        if grad is None:
            return None
        if view.rows is not None:
            grad = grad[view.rows[0] : view.rows[1]]
        return grad.mT if view.transposed else grad

    def block(self, parameter: str | nn.Parameter, site: str | None = None) -> Block:
        """The block of a parameter's use: by parameter (or its name), and the site module's name
        when the parameter has several uses."""
        name = (
            parameter
            if isinstance(parameter, str)
            else next(n for n, p in self.tracked.items() if p is parameter)
        )
        found = [
            b
            for b in self.blocks.values()
            if any(part.name == name for part in b.spec.parts)
            and (site is None or b.spec.site == site)
        ]
        if len(found) != 1:
            raise KeyError(f"{len(found)} blocks use {name!r}" + (f" in {site!r}" if site else ""))
        return found[0]

    def gradient_matrix(self, block: Block) -> Tensor | None:
        """The block's current gradient as ``[B, d_g, d_a]`` (what ``step()`` preconditions)."""
        return self._gradient_matrix(block)

    def _gradient_matrix(self, block: Block) -> Tensor | None:
        spec = block.spec
        weight = self._part_gradient(block, "weight", spec.weight)
        bias = self._part_gradient(block, "bias", spec.bias)
        if (spec.weight is not None and weight is None) or (spec.weight is None and bias is None):
            return None
        both_norm_parts = isinstance(block.model, NormModel) and spec.bias is not None
        if both_norm_parts and weight is not None and bias is None:
            bias = torch.zeros_like(weight)
        return block.model.to_matrix(weight, bias)

    def precondition(
        self, *, grad_scale: float | Tensor = 1.0, finite: Tensor | None = None
    ) -> None:
        """Replace each use's gradient by its preconditioned, KL-clipped version (on the device:
        a result that is not finite, or comes from factors that never accepted a batch, leaves
        the raw gradient)."""
        damping = evaluate(self.options.damping, self.steps, "damping")
        assert damping is not None
        blocks = list(self.blocks.values())
        self.distributor.average_use_gradients(blocks)
        items = [
            (block, gradient)
            for block in blocks
            if (gradient := self._gradient_matrix(block)) is not None
        ]
        results = self.distributor.precondition(
            items, lambda block, grad: block.precondition(grad, self.compute_method, damping)
        )
        pairs = [
            (block, gradient, result)
            for (block, gradient), result in zip(items, results, strict=True)
            if result is not None
        ]
        kl_clip = evaluate(self.options.kl_clip, self.steps, "kl_clip")
        scale: Tensor | None = None
        if kl_clip is not None and pairs:
            rates = self._learning_rates()
            scale = linalg.kl_clip_scale(
                [torch.where(ok, p, torch.zeros_like(p)) for _, _, (p, ok) in pairs],
                [g for _, g, _ in pairs],
                [self._rate(block, rates) for block, _, _ in pairs],
                kl_clip,
                grad_scale,
            )
        finals: dict[str, Tensor] = {}
        for block, gradient, (preconditioned, ok) in pairs:
            if scale is not None:
                preconditioned = preconditioned * scale.to(preconditioned)
            finals[block.name] = torch.where(ok, preconditioned, gradient)
        self._write_back(blocks, finals)
        fallbacks = [ok for _, _, (_, ok) in pairs]
        if fallbacks:
            count = (~torch.stack(fallbacks)).sum()
            if finite is not None:  # non-finite raw gradients explain non-finite results
                count = count * finite
            self._nonfinite_results = (
                count if self._nonfinite_results is None else self._nonfinite_results + count
            )
        self.last_step_info.update(
            damping=damping, kl_clip=kl_clip, kl_scale=scale, preconditioned_uses=len(pairs)
        )

    def _rate(self, block: Block, rates: dict[int, float]) -> float:
        part = block.spec.weight or block.spec.bias
        assert part is not None
        return rates.get(id(self.tracked[part.name]), 0.0)

    def _write_back(self, blocks: list[Block], finals: dict[str, Tensor]) -> None:
        """Write each block's result into ``.grad``: rows of single-use parameters directly,
        the sum over uses for parameters with overlapping uses."""
        sums: dict[str, Tensor] = {}
        for block in blocks:
            final = finals.get(block.name)
            if final is None:
                if block.alias_parts:  # no result: this use's raw gradient joins the sum
                    raw = self._gradient_matrix(block)
                    if raw is None:
                        continue
                    final = raw
                else:
                    continue
            weight, bias = block.model.from_matrix(final)
            for role, view, value in (
                ("weight", block.spec.weight, weight),
                ("bias", block.spec.bias, bias),
            ):
                if view is None or value is None:
                    continue
                param = self.tracked[view.name]
                if view.transposed:
                    value = value.mT
                if role in block.alias_parts:
                    total = sums.get(view.name)
                    if total is None:
                        total = sums[view.name] = torch.zeros_like(
                            param.grad if param.grad is not None else param
                        )
                    target = total if view.rows is None else total[view.rows[0] : view.rows[1]]
                    target.add_(value.to(target.dtype))
                else:
                    grad = param.grad
                    if grad is None:
                        continue
                    target = grad if view.rows is None else grad[view.rows[0] : view.rows[1]]
                    target.copy_(value.reshape(target.shape))
        for name, total in sums.items():
            param = self.tracked[name]
            if param.grad is None:
                param.grad = total
            else:
                param.grad.copy_(total)
        for block in blocks:
            block.use_gradients.clear()

    # -- unexpected uses ------------------------------------------------------------------
    def _pick_up_unexpected(self) -> None:
        """Uses first seen after the structure was fixed join it (agreed between workers)."""
        new = self.distributor.agree_on_new_uses(
            sorted(self.capture.unexpected, key=self._spec_key)
        )
        self.capture.unexpected = {}
        if not new:
            return
        for spec in new:
            self.capture.discovered.setdefault(spec)
            if spec not in self.capture.blocks:
                self.capture.blocks[spec] = self._make_block(spec)
        labels = ", ".join(f"{s.parts[0].name} ({s.label()})" for s in new)
        self._warn_once(
            f"unexpected:{labels}",
            f"K-FAC saw uses that were not in the first training step: {labels}; they are "
            "preconditioned from now on (the steps before treated those parameters as if "
            "the new uses did not exist)",
            KFACCoverageWarning,
        )
        self.fix_structure()

    # -- faults ----------------------------------------------------------------------------
    def _warn_once(
        self, key: str, message: str, category: type[Warning] = KFACNumericalWarning
    ) -> None:
        if key in self._reported:
            return
        self._reported.add(key)
        warnings.warn(message, category, stacklevel=3)

    def _report_faults(self) -> None:
        """Read the device-side fault counters (one host sync) and warn once per kind."""
        counters: list[Tensor] = []
        labels: list[str] = []
        for block in self.blocks.values():
            for side, factor in zip(
                ("A", "G") if len(block.factors) == 2 else ("F",), block.factors, strict=True
            ):
                if factor.rejected is not None:
                    counters.append(factor.rejected)
                    labels.append(f"factor:{block.name}.{side}")
        if self.nonfinite_steps is not None:
            counters.append(self.nonfinite_steps)
            labels.append("nonfinite_steps")
        results = self._nonfinite_results
        if results is not None:
            counters.append(results)
            labels.append("nonfinite_results")
        for block in self.blocks.values():
            if block.mixed_sample_calls:
                self._warn_once(
                    f"mixed_samples:{block.name}",
                    f"K-FAC: {block.name} was called in one forward both on the whole batch and "
                    "on parts of it; its per-sample sums cannot be aligned, so each call's "
                    "samples are counted as samples of their own (an approximation)",
                )
        if not counters:
            return
        values = torch.stack([c.to(torch.int64) for c in counters]).tolist()
        amp = self.grad_scaler is not None and self.grad_scaler.is_enabled()
        for label, value in zip(labels, values, strict=True):
            if not value:
                continue
            if label.startswith("factor:"):
                if amp:
                    continue  # routine overflow: the scaler skips those steps
                name = label.removeprefix("factor:")
                self._warn_once(
                    label,
                    f"K-FAC skipped a non-finite factor batch for {name}; the running average is "
                    "unchanged (reported once per factor)",
                )
            elif label == "nonfinite_steps":
                self._warn_once(
                    label,
                    "K-FAC skipped steps with non-finite gradients (gradients zeroed, factors "
                    "unchanged; counted in kfac/nonfinite_skipped_steps); pass "
                    "nonfinite_gradients='raise' to stop instead",
                )
            else:
                self._warn_once(
                    label,
                    "K-FAC's preconditioned gradient was not finite for some uses; they kept "
                    "their raw gradient",
                )

    # -- persistence -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Factors (running averages), counters, the structure and the sampling generators.

        Local to this worker: in ``broadcast_gradients`` mode it lacks the decompositions other
        workers own (use ``full_state_dict()`` on every worker for an exact resume)."""
        blocks: dict[str, Any] = {}
        for block in self.blocks.values():
            blocks[block.name] = {
                "spec": block.spec.to_state(),
                "factors": [factor.state_dict() for factor in block.factors],
                "generators": {k: g.get_state() for k, g in block.generators.items()},
            }
        return {
            "version": STATE_VERSION,
            "steps": self.steps,
            "last_inverse_step": self.last_inverse_step,
            "compute_method": str(self.compute_method),
            "blocks": blocks,
        }

    def full_state_dict(self) -> dict[str, Any]:
        """``state_dict()`` with every decomposition the run holds on *any* worker: a collective
        in ``broadcast_gradients`` mode (decompositions live on their owners), so call it on every
        worker (``KFACDDPStrategy.save_checkpoint`` does). A resumed run then continues exactly."""
        restore = self.distributor.share_decompositions(list(self.blocks.values()))
        try:
            return self.state_dict()
        finally:
            restore()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore factors and counters, then recompute the decompositions that were not saved.

        Validated first: a state of another format, model or corrupted values raises
        ``ValueError`` naming the block. Before the first step (the structure is traced in the
        first training forward) the state is kept and applied when the structure is fixed; its
        uses join the structure. Decompositions of another ``compute_method`` are recomputed
        from the saved factors.
        """
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(
                "K-FAC state of an unknown format (saved by another version of lightning-kfac?); "
                "resume without it to start K-FAC afresh"
            )
        self.steps = int(state["steps"])
        self.last_inverse_step = state["last_inverse_step"]
        blocks_state = {
            name: {**entry, "spec": UseSpec.from_state(entry["spec"])}
            for name, entry in state["blocks"].items()
        }
        state = {**state, "blocks": blocks_state}
        for name, entry in state["blocks"].items():
            for part in entry["spec"].parts:
                if part.name not in self.tracked:
                    raise ValueError(
                        f"K-FAC checkpoint: block {name} uses parameter {part.name}, which this "
                        "model does not train: was the state saved for another model?"
                    )
        if self.structure is None:
            for name, entry in state["blocks"].items():
                spec = entry["spec"]
                self.capture.discovered.setdefault(spec)
                if spec not in self.capture.blocks:
                    self.capture.blocks[spec] = self._make_block(spec)
                block = self.capture.blocks[spec]
                for index, (factor, saved) in enumerate(
                    zip(block.factors, entry["factors"], strict=True)
                ):
                    factor.check_state(saved, f"{name}[{index}]")
                # The first resumed forward samples rows before the state is applied in step().
                self._restore_generators(block, entry.pop("generators", {}))
            self._pending_state = state
            return
        self._load_block_state(state)

    @staticmethod
    def _restore_generators(block: Block, states: dict[str, Tensor]) -> None:
        for key, generator_state in states.items():
            generator = torch.Generator(device=key)
            generator.set_state(generator_state)
            block.generators[key] = generator

    def _load_block_state(self, state: dict[str, Any], *, checked: bool = False) -> None:
        by_spec = {block.spec: block for block in self.blocks.values()}
        same_method = state.get("compute_method") == str(self.compute_method)
        for name, entry in state["blocks"].items():
            block = by_spec.get(entry["spec"])
            if block is None:
                self._warn_once(
                    f"checkpoint:{name}",
                    f"K-FAC checkpoint: block {name} is not part of this model's preconditioned "
                    "uses any more; its state is ignored",
                    KFACCoverageWarning,
                )
                continue
            device = next(iter(self.tracked.values())).device
            part = block.spec.weight or block.spec.bias
            if part is not None:
                device = self.tracked[part.name].device
            for index, (factor, saved) in enumerate(
                zip(block.factors, entry["factors"], strict=True)
            ):
                if not checked:
                    factor.check_state(saved, f"{name}[{index}]")
                if not same_method:
                    saved = {k: v for k, v in saved.items() if k != "decomposition"}
                factor.load_state_dict(saved, device)
            self._restore_generators(block, entry.get("generators", {}))
        missing = [b for b in self.blocks.values() if b.has_factors and not b.has_decomposition]
        if missing and self.last_inverse_step is not None:
            current = self.steps
            self.steps = self.last_inverse_step  # schedules evaluated as on that step
            try:
                self.update_decompositions(only_missing=True)
            finally:
                self.steps = current
