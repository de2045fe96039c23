"""KFACPreconditioner: K-FAC (Martens & Grosse 2015) for any ``nn.Module``, in plain PyTorch.

Usage::

    pre = KFACPreconditioner(model, damping=1e-3, optimizer=optimizer)
    loss = loss_fn(model(x), y)     # the model's forward marks the micro-batch (N = x.shape[0])
    loss.backward()
    pre.step()                      # rewrites .grad of every preconditioned parameter in place
    optimizer.step()

K-FAC's blocks belong to *uses* of trainable parameters, found by tracing the first training
forward (``tracing``; the kinds of use are listed by ``kinds.supported_uses_markdown()``). The
structure is fixed at the first ``step()`` (agreed between workers), reported
(``coverage_report()``, and a ``KFACCoverageWarning`` naming every parameter left to the
optimizer), and traced again when the set of trainable parameters changes.

Each ``step()`` is one orchestration of five stages (data flows one way):

1. on factor-update steps (``step % factor_update_interval == 0``) the captured sums are reduced
   over workers (weighted by what each captured) and folded into the running averages;
2. on inverse-update steps (``step % inverse_update_interval == 0``) the factors are decomposed,
   same-shaped ones in one batched call;
3. every use's gradient ``dW`` is replaced by ``P = (A ⊗ G + λ I)^-1 vec(dW)`` (unit-wise:
   ``(F + λ I)^-1 u``); a parameter with several uses gets the sum of its uses' ``P``;
4. with ``kl_clip`` set, all ``P`` are scaled by ``ν = min(1, sqrt(κ / Σ lr² <P, dW>)))``;
5. faults (rejected factor batches, failed decompositions, non-finite steps) are reported once.

What the step used and how long each stage took is in ``last_step`` (a ``StepRecord``). No stage
reads a device value back to the host, except the decompositions themselves (``eigh`` checks
convergence) and the fault report on inverse-update steps; choices that depend on values (a
non-finite batch, a non-finite ``P``) are made on the device with ``torch.where``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from lightning_kfac.kfac import linalg, state
from lightning_kfac.kfac.blocks import Block
from lightning_kfac.kfac.capture import CaptureSettings, UseCapture
from lightning_kfac.kfac.compute import factor_inverse
from lightning_kfac.kfac.decomposition import decompose_blocks
from lightning_kfac.kfac.distribution import Distributor, LocalDistributor
from lightning_kfac.kfac.faults import FaultReporter, KFACCoverageWarning, KFACNumericalWarning
from lightning_kfac.kfac.kinds import make_model
from lightning_kfac.kfac.options import (
    ComputeMethod,
    KFACApproximation,
    KFACOptions,
    NonFiniteGradients,
    evaluate,
)
from lightning_kfac.kfac.parameters import TrackedParameters
from lightning_kfac.kfac.routing import GradientRouter
from lightning_kfac.kfac.structure import Structure, format_table
from lightning_kfac.kfac.uses import UseSpec

__all__ = ["KFACCoverageWarning", "KFACNumericalWarning", "KFACPreconditioner", "StepRecord"]


@dataclasses.dataclass
class StepRecord:
    """What one ``step()`` did and used (for loggers; ``KFACDDPStrategy`` logs it).

    Attributes:
        step: The step's index (``steps`` before it).
        damping: The ``λ`` its preconditioning used: the current value with ``"eigen"``; with
            ``"inverse"`` the value baked into the inverses in use.
        kl_clip: ``κ`` of this step (None: no KL-clip).
        kl_scale: The KL-clip factor ``ν`` applied (0-dim tensor), or None.
        preconditioned_uses: Uses whose gradient was preconditioned.
        factors_updated: Whether the factors were updated.
        inverses_updated: Whether this was an inverse-update step.
        seconds: Wall time of the stages ``factors``, ``inverses``, ``precondition``.
        nonfinite_skipped_steps: The count of steps skipped for non-finite gradients so far
            (device-side), when this step checked for them.
    """

    step: int
    damping: float = math.nan
    kl_clip: float | None = None
    kl_scale: Tensor | None = None
    preconditioned_uses: int = 0
    factors_updated: bool = False
    inverses_updated: bool = False
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    nonfinite_skipped_steps: Tensor | None = None


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
            optimizer, and the table at DEBUG level) when the structure is fixed. A distributed
            runner passes True on one rank only.
        loss_scale: Multiplier of the backpropagated loss relative to the mean loss of the
            micro-batch (e.g. ``1 / accumulate_grad_batches``); the AMP scale comes on top.
        is_final_backward: Whether the running backward is the last before ``step()`` (all
            micro-batches done); then a block's factors may be reduced as soon as its capture
            completes. Default: never (reduce everything in ``step()``).
        profile: A ``profile(name)`` context-manager factory (e.g. a Lightning profiler's) that
            times the stages ``kfac/factors``, ``kfac/inverses``, ``kfac/precondition``.
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
        loss_scale: float = 1.0,
        is_final_backward: Callable[[], bool] | None = None,
        profile: Callable[[str], AbstractContextManager[Any]] | None = None,
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
        self.loss_scale = float(loss_scale)
        self.is_final_backward = is_final_backward
        self.profile = profile
        self.compute_method = ComputeMethod(opts.compute_method)
        self.inverse = factor_inverse(self.compute_method)
        #: Number of completed ``step()`` calls.
        self.steps = 0
        self.last_inverse_step: int | None = None
        #: What the last ``step()`` did (None before the first).
        self.last_step: StepRecord | None = None
        #: Steps whose raw gradients were not finite (device-side counter, no AMP scaler).
        self.nonfinite_steps: Tensor | None = None
        #: Steps the AMP scaler skips (non-finite scaled gradients; device-side counter).
        self.amp_skipped_steps: Tensor | None = None
        self.faults = FaultReporter()
        self._report = report
        self._nonfinite_results: Tensor | None = None
        self._capture_enabled = True
        #: The damping baked into the current inverses (compute_method="inverse").
        self._decomposition_damping: float | None = None

        parameter_dtype = next((p.dtype for p in model.parameters()), torch.float32)
        widest = torch.promote_types(torch.float32, parameter_dtype)
        self.factor_dtype: torch.dtype = opts.factor_dtype or widest  # type: ignore[assignment]
        self.inverse_dtype: torch.dtype = opts.inverse_dtype or self.factor_dtype  # type: ignore[assignment]

        self.parameters = TrackedParameters(model, opts.skip_modules)  # type: ignore[arg-type]
        if not self.parameters.tracked:
            raise ValueError(
                "KFACPreconditioner found no trainable parameter to track "
                f"(skipped: {self.parameters.skipped or 'none'}); check skip_modules and "
                "requires_grad"
            )
        self.router = GradientRouter(self.parameters.tracked)
        self.capture = UseCapture(
            model,
            self.parameters,
            CaptureSettings(
                self.factor_dtype,
                KFACApproximation(opts.approximation),
                opts.factor_max_rows,
                opts.max_factor_dim,
                opts.batch_dim,
                opts.padding_mask,
            ),
            loss_scale=self._current_loss_scale,
            on_complete=self._use_complete,
        )
        self.structure: Structure | None = None
        #: Blocks of the agreed structure by name, in order (the same on every worker).
        self.blocks: dict[str, Block] = {}
        self._by_spec: dict[UseSpec, Block] = {}
        self._pending_state: state.SavedState | None = None
        self.capture.start_discovery()

    # -- parameters ---------------------------------------------------------------------------
    @property
    def tracked(self) -> dict[str, nn.Parameter]:
        """Tracked (trainable, not skipped) parameters by name."""
        return self.parameters.tracked

    @property
    def skipped(self) -> dict[str, str]:
        """Trainable parameters left alone by configuration, with the reason."""
        return self.parameters.skipped

    # -- structure ----------------------------------------------------------------------------
    def _spec_key(self, spec: UseSpec) -> tuple[Any, ...]:
        first = spec.parts[0].name
        return (self.parameters.order.get(first, 1 << 30), spec.site, str(spec.kind), repr(spec))

    def fix_structure(self) -> None:
        """Agree on the uses traced so far (all workers), build the blocks, report coverage.

        ``step()`` calls it on the first step; call it yourself after one training forward to
        see ``coverage_report()`` (or plan communication) before training.
        """
        capture = self.capture
        local = sorted(dict.fromkeys([*capture.discovered, *capture.uses]), key=self._spec_key)
        specs, unsupported = self.distributor.agree_on_uses(local, capture.unsupported)
        specs = sorted(specs, key=self._spec_key)
        structure = Structure(
            specs,
            self.parameters.tracked,
            unsupported,
            self.parameters.skipped,
            lambda spec: capture.sums_of(spec).model,
        )
        structure.skipped_shapes(self.parameters.shapes)
        blocks: dict[str, Block] = {}
        for spec in structure.kept:
            sums = capture.sums_of(spec)
            previous = self._by_spec.get(spec)  # a block continues across structure changes
            block = Block(
                structure.names[spec],
                spec,
                sums.model,
                sums,
                self.factor_dtype,
                alias_parts=structure.alias_parts[spec],
                factors=previous.factors if previous is not None else None,
            )
            blocks[block.name] = block
        first = self.structure is None
        self.blocks = blocks
        self._by_spec = {block.spec: block for block in blocks.values()}
        self.structure = structure
        seen = {part.name for spec in specs for part in spec.parts} | set(capture.unsupported)
        unseen_owners = self.parameters.unseen_owners(seen)
        capture.set_structure(
            structure.kept, structure.alias_parts, [*structure.sites, *unseen_owners]
        )
        self.distributor.setup(list(blocks.values()), self.inverse, self.inverse_dtype)
        new = self.parameters.take_new_names()
        if new and not first:
            names = ", ".join(new)
            self.faults.warn_once(
                f"trainable:{names}",
                f"K-FAC: parameters became trainable during training ({names}); their uses were "
                "traced in the last forward and are preconditioned from this step on",
                KFACCoverageWarning,
            )
        if self._pending_state is not None:
            saved, self._pending_state = self._pending_state, None
            self._restore(saved)  # checked in load_state_dict
        if self._report:
            self.faults.coverage(structure)

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

    def block(self, parameter: str | nn.Parameter, site: str | None = None) -> Block:
        """The block of a parameter's use: by parameter (or its name), and the site module's name
        when the parameter has several uses."""
        name = parameter if isinstance(parameter, str) else self.parameters.name_of(parameter)
        found = [
            b
            for b in self.blocks.values()
            if any(part.name == name for part in b.spec.parts)
            and (site is None or b.spec.site == site)
        ]
        if len(found) != 1:
            raise KeyError(f"{len(found)} blocks use {name!r}" + (f" in {site!r}" if site else ""))
        return found[0]

    # -- capture ---------------------------------------------------------------------------
    @property
    def capture_enabled(self) -> bool:
        """False freezes the factors at their current values (no capture)."""
        return self._capture_enabled

    @capture_enabled.setter
    def capture_enabled(self, enabled: bool) -> None:
        self._capture_enabled = bool(enabled)
        self.capture.arm(self.capturing)

    @property
    def capturing(self) -> bool:
        """Whether the passes before the coming ``step()`` feed the factors."""
        return self._capture_enabled and self.steps % self.options.factor_update_interval == 0

    def _current_loss_scale(self) -> float | Tensor:
        scale: float | Tensor = self.loss_scale
        scaler = self.grad_scaler
        if scaler is not None and scaler.is_enabled():
            scaler_scale = getattr(scaler, "_scale", None)  # tensor: no host sync
            if not isinstance(scaler_scale, Tensor):
                scaler_scale = scaler.get_scale()
            scale = scaler_scale * scale
        return scale

    def _use_complete(self, spec: UseSpec) -> None:
        """A use's capture of the running backward is complete: on the final backward of the
        step, its sums may go to the workers' reduction now, overlapping the backward pass."""
        final = self.is_final_backward
        if final is None or self.capture.discovering or not final():
            return
        block = self._by_spec.get(spec)
        if block is not None:
            self.distributor.factors_ready(block)

    def discard_captured(self) -> None:
        """Drop what the hooks captured since the last step (a step that is not taken)."""
        self.capture.discard()
        if self.structure is not None and not self.capture.discovering:
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
        if self.capture.training_forwards == 0 and self.structure is None:
            raise RuntimeError(
                "KFACPreconditioner.step() before any training forward of the model it was "
                "built with: K-FAC finds the uses of the parameters by tracing that forward "
                "(model.train(), gradients enabled); call the model itself, not only submodules"
            )
        if self.structure is None or self.capture.discovering:
            self.fix_structure()
        damping = evaluate(self.options.damping, step, "damping")
        assert damping is not None
        record = self.last_step = StepRecord(step)
        finite = self._check_gradients(grad_scale, record)
        record.inverses_updated = step % self.options.inverse_update_interval == 0
        if step % self.options.factor_update_interval == 0:
            with self._timed("factors", record):
                self.update_factors(accept=finite)
            record.factors_updated = True
        if record.inverses_updated:
            # Every worker, every inverse step (an agreement, whatever each saw), after the factor
            # reduction has finished (its buckets are launched in different places on each rank).
            self._pick_up_unexpected()
        with self._timed("inverses", record):
            # Off-schedule, only blocks whose first factors just arrived or whose decomposition
            # failed last time.
            self.update_decompositions(damping, only_missing=not record.inverses_updated)
        with self._timed("precondition", record):
            self.precondition(damping, record, grad_scale=grad_scale, finite=finite)
        if record.inverses_updated:
            self.faults.device_faults(
                list(self.blocks.values()),
                nonfinite_steps=self.nonfinite_steps,
                nonfinite_results=self._nonfinite_results,
                amp=self.grad_scaler is not None and self.grad_scaler.is_enabled(),
            )
        self.steps += 1
        self.capture.arm(self.capturing)

    @contextmanager
    def _timed(self, stage: str, record: StepRecord) -> Iterator[None]:
        start = time.perf_counter()
        with self.profile(f"kfac/{stage}") if self.profile is not None else nullcontext():
            yield
        record.seconds[stage] = time.perf_counter() - start

    def _check_gradients(self, grad_scale: float | Tensor, record: StepRecord) -> Tensor | None:
        """Device-side finiteness of all raw gradients; without an AMP scaler, a non-finite step
        is skipped (gradients zeroed, factors unchanged) or raises, as configured."""
        grads = [p.grad for p in self.parameters.all if p.grad is not None]
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
        record.nonfinite_skipped_steps = self.nonfinite_steps
        return finite

    def update_factors(self, accept: Tensor | None = None) -> None:
        """Reduce the step's sums over workers and fold them into the running averages."""
        decay = evaluate(self.options.factor_decay, self.steps, "factor_decay")
        assert decay is not None
        blocks = list(self.blocks.values())
        for sums in self.capture.uses.values():
            sums.finish()
        reduced = self.distributor.reduce_factor_sums(blocks)
        for block, sums in zip(blocks, reduced, strict=True):
            if sums is None:
                continue
            for factor, (total, count) in zip(block.factors, sums, strict=True):
                factor.update(total, count, decay, accept)

    def update_decompositions(self, damping: float, *, only_missing: bool = False) -> None:
        """Decompose the factors of every block (or only of those without a decomposition).

        With ``compute_method="inverse"`` the damping is part of the inverses: an on-schedule
        update uses ``damping``, and the decompositions made off schedule (``only_missing``) use
        the damping of the last on-schedule update, so that every inverse in use shares one λ.
        """
        if self.inverse.damping_in_decomposition:
            if only_missing and self._decomposition_damping is not None:
                damping = self._decomposition_damping
            else:
                self._decomposition_damping = damping
        blocks = [
            block
            for block in self.blocks.values()
            if block.has_factors and not (only_missing and block.has_decomposition)
        ]
        if blocks:

            def decompose(owned: list[Block]) -> dict[str, list[str]]:
                return decompose_blocks(owned, self.inverse, damping, self.inverse_dtype)

            faults = self.distributor.run_decompositions(blocks, decompose)
            self.faults.decomposition_faults(blocks, faults)
        if not only_missing:
            self.last_inverse_step = self.steps

    def _learning_rates(self) -> dict[int, float]:
        """Learning rate per parameter id: the schedule ``lr`` or the optimizer's param groups."""
        if self.options.lr is not None:
            lr = evaluate(self.options.lr, self.steps, "lr")
            assert lr is not None
            return {id(p): lr for p in self.parameters.tracked.values()}
        assert self.optimizer is not None
        return {
            id(p): float(group["lr"])
            for group in self.optimizer.param_groups
            for p in group["params"]
        }

    def _rate(self, block: Block, rates: dict[int, float]) -> float:
        return rates.get(id(self.parameters.tracked[block.spec.first_part.name]), 0.0)

    # -- preconditioning -------------------------------------------------------------------
    def gradient_matrix(self, block: Block) -> Tensor | None:
        """The block's current gradient as ``[B, d_g, d_a]`` (what ``step()`` preconditions)."""
        return self.router.gradient_matrix(block, block.sums.use_gradients)

    def precondition(
        self,
        damping: float,
        record: StepRecord,
        *,
        grad_scale: float | Tensor = 1.0,
        finite: Tensor | None = None,
    ) -> None:
        """Replace each use's gradient by its preconditioned, KL-clipped version (on the device:
        a result that is not finite, or comes from factors that never accepted a batch, leaves
        the raw gradient)."""
        if self.inverse.damping_in_decomposition and self._decomposition_damping is not None:
            damping = self._decomposition_damping  # what the inverses in use were made with
        record.damping = damping
        blocks = list(self.blocks.values())
        use_gradients = self.distributor.average_use_gradients(
            blocks, {block.name: block.sums.take_use_gradients() for block in blocks}
        )
        items = [
            (block, gradient)
            for block in blocks
            if (gradient := self.router.gradient_matrix(block, use_gradients.get(block.name, {})))
            is not None
        ]
        results = self.distributor.precondition(
            items, lambda block, grad: block.precondition(grad, self.inverse, damping)
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
        self.router.write_back(blocks, finals, use_gradients)
        fallbacks = [(~ok).any() for _, _, (_, ok) in pairs]
        if fallbacks:
            count = torch.stack(fallbacks).sum()
            if finite is not None:  # non-finite raw gradients explain non-finite results
                count = count * finite
            self._nonfinite_results = (
                count if self._nonfinite_results is None else self._nonfinite_results + count
            )
        record.kl_clip, record.kl_scale, record.preconditioned_uses = kl_clip, scale, len(pairs)

    # -- unexpected uses ------------------------------------------------------------------
    def _pick_up_unexpected(self) -> None:
        """Uses first seen after the structure was fixed join it (agreed between workers)."""
        new = self.distributor.agree_on_new_uses(
            sorted(self.capture.take_unexpected(), key=self._spec_key)
        )
        if not new:
            return
        self.capture.adopt(new)
        labels = ", ".join(f"{s.parts[0].name} ({s.label()})" for s in new)
        self.faults.warn_once(
            f"unexpected:{labels}",
            f"K-FAC saw uses that were not in the first training step: {labels}; they are "
            "preconditioned from now on (the steps before treated those parameters as if "
            "the new uses did not exist)",
            KFACCoverageWarning,
        )
        self.fix_structure()

    # -- persistence -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Factors (running averages), counters, the structure and the sampling generators.

        Local to this worker: in ``broadcast_gradients`` mode it lacks the decompositions other
        workers own (use ``full_state_dict()`` on every worker for an exact resume)."""
        return state.save(
            self.steps,
            self.last_inverse_step,
            self.compute_method,
            self.blocks.values(),
            state.saved_options(self.options, self.factor_dtype, self.inverse_dtype),
        )

    def full_state_dict(self) -> dict[str, Any]:
        """``state_dict()`` with every decomposition the run holds on *any* worker: a collective
        in ``broadcast_gradients`` mode (decompositions live on their owners), so call it on every
        worker (``KFACDDPStrategy.save_checkpoint`` does). A resumed run then continues exactly."""
        restore = self.distributor.share_decompositions(list(self.blocks.values()))
        try:
            return self.state_dict()
        finally:
            restore()

    def load_state_dict(self, saved_state: dict[str, Any]) -> None:
        """Restore factors and counters, then recompute the decompositions that were not saved.

        Validated first: a state of another format, model or corrupted values raises
        ``ValueError`` naming the block. Before the first step (the structure is traced in the
        first training forward) the state is kept and applied when the structure is fixed; its
        uses join the structure. Decompositions of another ``compute_method`` are recomputed
        from the saved factors. Every option that differs from the one the state was saved with
        is named once (a ``UserWarning`` saying what the difference means); blocks of
        parameters that ``skip_modules`` now leaves to the optimizer are dropped, said once.
        """
        parameters = self.parameters
        saved = state.parse(saved_state, parameters.tracked, parameters.skipped, parameters.shapes)
        if self._report:
            now = state.saved_options(self.options, self.factor_dtype, self.inverse_dtype)
            for message in state.option_differences(saved.options, now):
                self.faults.warn_once(f"checkpoint-option:{message}", message, UserWarning)
            if saved.dropped:
                names = ", ".join(saved.dropped)
                self.faults.warn_once(
                    f"checkpoint-skipped:{names}",
                    f"K-FAC checkpoint: the state of {names} is dropped: skip_modules="
                    f"{self.options.to_dict()['skip_modules']} leaves their parameters to the "
                    "optimizer in this run",
                    KFACCoverageWarning,
                )
        shapes, max_dim = self.capture.index.shapes, self.options.max_factor_dim
        for entry in saved.blocks:
            state.check_factors(entry, make_model(entry.spec, shapes, max_dim), self.factor_dtype)
        self.steps = saved.steps
        self.last_inverse_step = saved.last_inverse_step
        self.capture.arm(self.capturing)
        if self.structure is None:
            self.capture.adopt(entry.spec for entry in saved.blocks)
            for entry in saved.blocks:
                # The first resumed forward samples rows before the state is applied in step():
                # the generators are restored now, and only now.
                self.capture.sums_of(entry.spec).sampler.load(entry.generators)
                entry.generators = {}
            self._pending_state = saved
            return
        self._restore(saved)

    def _restore(self, saved: state.SavedState) -> None:
        def device_of(block: Block) -> torch.device:
            return self.parameters.tracked[block.spec.first_part.name].device

        ignored = state.restore(saved, self._by_spec, self.compute_method, device_of)
        for entry in ignored:
            self.faults.warn_once(
                f"checkpoint:{entry.name}",
                f"K-FAC checkpoint: block {entry.name} is not part of this model's preconditioned "
                "uses any more; its state is ignored",
                KFACCoverageWarning,
            )
        missing = [b for b in self.blocks.values() if b.has_factors and not b.has_decomposition]
        if missing and self.last_inverse_step is not None:
            # the decompositions the run had: those of its last inverse-update step
            damping = evaluate(self.options.damping, self.last_inverse_step, "damping")
            assert damping is not None
            self._decomposition_damping = None
            self.update_decompositions(damping, only_missing=True)
