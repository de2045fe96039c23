"""KFACPreconditioner: K-FAC (Martens & Grosse 2015) for any ``nn.Module``, in plain PyTorch.

Usage::

    pre = KFACPreconditioner(model, damping=1e-3, optimizer=optimizer)
    loss.backward()
    pre.step()          # rewrites .grad of every registered layer in place
    optimizer.step()

Each ``step()`` is one orchestration of four stages (data flows one way):

1. on factor-update steps (``step % factor_update_interval == 0``) the hooks have captured ``A``
   and ``G`` sums during the forward/backward passes since the last ``step()``; their batch
   estimates are averaged over workers (``Distributor``) and folded into the running averages;
2. on inverse-update steps (``step % inverse_update_interval == 0``) the factors are decomposed;
3. every registered layer's gradient ``dW`` is replaced by ``P = (A ⊗ G + λ I)^-1 vec(dW)``;
4. with ``kl_clip`` set, all ``P`` are scaled by ``ν = min(1, sqrt(κ / Σ lr² <P, dW>)))``.

Damping has the same meaning at any batch size and number of workers because ``G`` is built
from per-sample output gradients (DESIGN §2), not from the ``1/N``-scaled gradients a
mean-reduced loss backpropagates.
"""

from __future__ import annotations

import fnmatch
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_kfac.kfac import linalg
from lightning_kfac.kfac.distribution import Distributor, LocalDistributor
from lightning_kfac.kfac.kfac_layer import KFACLayer
from lightning_kfac.kfac.layers import adapter_for
from lightning_kfac.kfac.options import ComputeMethod, Schedule, evaluate

log = logging.getLogger(__name__)


class KFACNumericalWarning(RuntimeWarning):
    """A numerical fault K-FAC recovered from (skipped factor batch, failed decomposition)."""


SkipSpec = str | type[nn.Module]


class KFACPreconditioner:
    """Kronecker-factored preconditioner for the ``nn.Linear`` and ``nn.Conv2d`` layers of a model.

    Args:
        model: The model; every trainable ``nn.Linear`` / ``nn.Conv2d`` is registered unless
            skipped. Other modules, frozen layers and skipped layers keep their raw gradients.
        damping: ``λ`` (float or callable of the step). Eigen method: added to the eigenvalue
            products, i.e. the exact inverse of ``A ⊗ G + λ I``.
        factor_update_interval: Capture activations / output gradients and update the factors
            every this many steps (capture happens only in the passes before those steps).
        inverse_update_interval: Recompute the decompositions every this many steps.
        factor_decay: Running-average decay of the factors (float or callable of the step).
        kl_clip: ``κ`` of the KL-clip (float or callable); ``None`` disables it.
        lr: Learning rate for the KL-clip (float or callable). When omitted the current lr of
            each layer's param group in ``optimizer`` is used.
        optimizer: The optimizer that will apply the step; only read for its learning rates.
        skip_modules: Modules to leave untouched: qualified names or class names (``fnmatch``
            patterns such as ``"head.*"`` or ``"Conv2d"``) or module classes.
        factor_dtype: Dtype of the factors; default float32, or the parameter dtype if wider.
        inverse_dtype: Dtype of the decompositions; default as ``factor_dtype``.
        compute_method: ``ComputeMethod.EIGEN`` (default, exact damped inverse) or
            ``ComputeMethod.INVERSE`` (factored Tikhonov with π correction).
        factor_max_rows: Estimate each layer's factor batch from at most this many of its
            ``N·T`` rows (patches of a convolution), drawn uniformly without replacement and
            rescaled by ``N·T / rows``: an unbiased estimator of the exact batch factor, at a
            fraction of the cost for convolutions with many output locations. ``None`` (default):
            all rows, exact.
        grad_scaler: An AMP ``GradScaler`` whose loss scale is divided out of the captured output
            gradients (call ``scaler.unscale_(optimizer)`` before ``step()``).
        distributor: How work is shared among workers; default one worker.
        report_registration: Log ``registration_summary()`` at INFO level once, on construction
            (a distributed runner passes True on one rank only).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        damping: Schedule = 1e-3,
        factor_update_interval: int = 1,
        inverse_update_interval: int = 10,
        factor_decay: Schedule = 0.95,
        kl_clip: Schedule | None = 1e-3,
        lr: Schedule | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        skip_modules: Iterable[SkipSpec] = (),
        factor_dtype: torch.dtype | None = None,
        inverse_dtype: torch.dtype | None = None,
        compute_method: ComputeMethod | str = ComputeMethod.EIGEN,
        factor_max_rows: int | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        distributor: Distributor | None = None,
        report_registration: bool = True,
    ) -> None:
        for name, interval in (
            ("factor_update_interval", factor_update_interval),
            ("inverse_update_interval", inverse_update_interval),
        ):
            if not isinstance(interval, int) or interval < 1:
                raise ValueError(f"{name} must be a positive integer, got {interval!r}")
        if factor_max_rows is not None and factor_max_rows < 1:
            raise ValueError(
                f"factor_max_rows must be a positive integer or None, got {factor_max_rows!r}"
            )
        if kl_clip is not None and lr is None and optimizer is None:
            raise ValueError(
                "kl_clip needs a learning rate: pass lr=..., or optimizer=... to read it from, "
                "or kl_clip=None to disable KL-clipping"
            )
        try:
            self.compute_method = ComputeMethod(compute_method)
        except ValueError:
            choices = ", ".join(repr(m.value) for m in ComputeMethod)
            raise ValueError(
                f"compute_method must be one of {choices}, got {compute_method!r}"
            ) from None
        self.damping = damping
        self.factor_update_interval = factor_update_interval
        self.inverse_update_interval = inverse_update_interval
        self.factor_decay = factor_decay
        self.kl_clip = kl_clip
        self.lr = lr
        self.optimizer = optimizer
        self.grad_scaler = grad_scaler
        self.distributor = distributor if distributor is not None else LocalDistributor()
        #: Extra multiplier of the backpropagated loss relative to the micro-batch mean loss
        #: (e.g. ``1 / accumulation_steps``); divided out of the captured output gradients.
        self.loss_scale: float | Tensor = 1.0
        #: Set False to stop capturing without removing the hooks.
        self.capture_enabled = True
        #: Returns True during the last backward pass before ``step()`` (the one DDP
        #: synchronises); lets the distributor start reducing a layer's factors as soon as its
        #: output gradient is captured. None: no early reduction.
        self.is_final_backward: Callable[[], bool] | None = None
        #: Number of completed ``step()`` calls.
        self.steps = 0
        self.last_inverse_step: int | None = None
        #: Figures of the last step (``kl_scale``, ``damping``, ``*_time`` in seconds), for loggers.
        self.last_step_info: dict[str, Any] = {}
        #: Optional ``profile(name)`` context manager factory (e.g. a Lightning profiler's
        #: ``profile``) wrapped around the timed stages ``kfac/factors``, ``kfac/inverses`` and
        #: ``kfac/precondition``. Times are host wall-clock (asynchronous on accelerators).
        self.profile: Callable[[str], AbstractContextManager[Any]] | None = None

        parameter_dtype = next((p.dtype for p in model.parameters()), torch.float32)
        widest = torch.promote_types(torch.float32, parameter_dtype)
        self.factor_dtype = factor_dtype or widest
        self.inverse_dtype = inverse_dtype or self.factor_dtype

        self.layers: dict[str, KFACLayer] = {}
        #: Modules with parameters that were not registered, with the reason.
        self.skipped_modules: dict[str, str] = {}
        self._reported: set[str] = set()
        self._handles: list[RemovableHandle] = []
        self.factor_max_rows = factor_max_rows
        self._report_registration = report_registration
        self._register(model, list(skip_modules))

    # -- registration ----------------------------------------------------------------------
    @staticmethod
    def _matches(name: str, module: nn.Module, specs: list[SkipSpec]) -> bool:
        for spec in specs:
            if isinstance(spec, str):
                if fnmatch.fnmatchcase(name, spec) or fnmatch.fnmatchcase(
                    type(module).__name__, spec
                ):
                    return True
            elif isinstance(module, spec):
                return True
        return False

    def _register(self, model: nn.Module, skip: list[SkipSpec]) -> None:
        for name, module in model.named_modules():
            if not any(True for _ in module.parameters(recurse=False)):
                continue
            adapter = adapter_for(module)
            if adapter is None:
                self.skipped_modules[name] = f"unsupported type {type(module).__name__}"
            elif self._matches(name, module, skip):
                self.skipped_modules[name] = "matched skip_modules"
            elif not adapter.weight.requires_grad:
                self.skipped_modules[name] = "frozen (weight.requires_grad is False)"
            else:
                layer = KFACLayer(
                    name,
                    adapter,
                    self.factor_dtype,
                    max_rows=self.factor_max_rows,
                    seed=len(self.layers),
                )
                self.layers[name] = layer
                self._handles.append(module.register_forward_hook(self._make_forward_hook(layer)))
        if not self.layers:
            raise ValueError(
                "KFACPreconditioner found no trainable nn.Linear or nn.Conv2d layer "
                f"(skipped: {self.skipped_modules or 'none'}); check skip_modules and requires_grad"
            )
        if self._report_registration:
            log.info(self.registration_summary())

    def registration_summary(self) -> str:
        """Which modules are preconditioned and which were skipped, with the reason."""
        skipped = ", ".join(f"{n} ({r})" for n, r in self.skipped_modules.items()) or "none"
        registered = ", ".join(self.layers)
        return f"K-FAC registered {len(self.layers)} layers: {registered}; skipped: {skipped}"

    def remove_hooks(self) -> None:
        """Detach the preconditioner from the model (no further capture)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- capture ---------------------------------------------------------------------------
    @property
    def capturing(self) -> bool:
        """Whether the passes before the coming ``step()`` feed the factors."""
        return self.capture_enabled and self.steps % self.factor_update_interval == 0

    def _current_loss_scale(self) -> float | Tensor:
        scale = self.loss_scale
        scaler = self.grad_scaler
        if scaler is not None and scaler.is_enabled():
            scaler_scale = getattr(scaler, "_scale", None)  # tensor: no host sync
            if not isinstance(scaler_scale, Tensor):
                scaler_scale = scaler.get_scale()
            scale = scaler_scale * scale
        return scale

    def _make_forward_hook(self, layer: KFACLayer):
        def forward_hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if not (self.capturing and module.training and torch.is_grad_enabled()):
                return
            device_type = output.device.type
            with torch.autocast(device_type=device_type, enabled=False):
                layer.capture(inputs[0], output)
            if isinstance(output, Tensor) and output.requires_grad:
                # A tensor hook on the output (not a module backward hook) keeps working when an
                # in-place activation follows the layer: it sees the gradient w.r.t. the output
                # as it was before the in-place change, i.e. w.r.t. the pre-activation.
                layer.pending_gradients += 1

                def output_gradient_hook(gradient: Tensor) -> None:
                    with torch.autocast(device_type=device_type, enabled=False):
                        layer.capture_output_gradient(gradient, self._current_loss_scale())
                    layer.pending_gradients -= 1
                    final = self.is_final_backward
                    if layer.pending_gradients == 0 and final is not None and final():
                        self.distributor.factors_ready(layer)

                output.register_hook(output_gradient_hook)

        return forward_hook

    # -- step ------------------------------------------------------------------------------
    def step(self, *, grad_scale: float | Tensor = 1.0) -> None:
        """Update factors / decompositions as scheduled and precondition the gradients in place.

        Args:
            grad_scale: The factor by which ``.grad`` currently exceeds the true gradient (a loss
                scale not yet unscaled). Preconditioning is linear, so only the KL-clip uses it.
        """
        step = self.steps
        self.last_step_info = {}
        if step % self.factor_update_interval == 0:
            with self._timed("factors"):
                self.update_factors()
        with self._timed("inverses"):
            # Off-schedule, only layers whose first factors just arrived or whose decomposition
            # failed last time.
            self.update_decompositions(only_missing=step % self.inverse_update_interval != 0)
        with self._timed("precondition"):
            self.precondition(grad_scale=grad_scale)
        self.steps += 1

    @contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        with self.profile(f"kfac/{stage}") if self.profile is not None else nullcontext():
            yield
        self.last_step_info[f"{stage}_time"] = time.perf_counter() - start

    def update_factors(self) -> None:
        """Fold the captured batch estimates into the running averages (stage 1)."""
        decay = evaluate(self.factor_decay, self.steps)
        assert decay is not None
        layers = [layer for layer in self.layers.values() if layer.has_batch]
        for layer in self.layers.values():
            layer.pending_gradients = 0
            if layer.has_batch:
                layer.finalize_batches()
            else:  # forward without backward (or the reverse): nothing usable this step
                layer.discard_batches()
        self.distributor.average_factor_batches(layers)
        for layer in layers:
            for side, factor in zip("AG", layer.factors, strict=True):
                if not factor.update(decay):
                    name = f"{layer.name}.{side}"
                    self._report(
                        f"factor:{name}",
                        f"K-FAC skipped a non-finite factor batch for {name}; the running "
                        "average is unchanged (reported once per factor)",
                        expected=self._overflow_expected(),
                    )

    def _overflow_expected(self) -> bool:
        """With an enabled AMP scaler, non-finite output gradients are routine (the scaler skips
        those steps), so they are logged at DEBUG level instead of warned about."""
        return self.grad_scaler is not None and self.grad_scaler.is_enabled()

    def discard_captured(self) -> None:
        """Drop what the hooks captured since the last step (a step the AMP scaler skips)."""
        for layer in self.layers.values():
            layer.pending_gradients = 0
            layer.discard_batches()

    def update_decompositions(self, *, only_missing: bool = False) -> None:
        """Decompose the factors of every layer (or only of those without a decomposition)."""
        damping = evaluate(self.damping, self.steps)
        assert damping is not None
        layers = [
            layer
            for layer in self.layers.values()
            if layer.has_factors and not (only_missing and layer.has_decomposition)
        ]
        if not layers:
            return

        def decompose(layer: KFACLayer) -> None:
            layer.compute_decompositions(self.compute_method, damping, self.inverse_dtype)

        self.distributor.run_decompositions(layers, decompose)
        for layer in layers:
            outcome = "retry" if layer.has_decomposition else "fallback"
            for fault in layer.faults:
                self._report(
                    f"decomposition:{layer.name}:{outcome}",
                    f"K-FAC decomposition of {layer.name} {fault}"
                    + (
                        "" if layer.has_decomposition else "; using the raw gradient for this layer"
                    ),
                )
        if not only_missing:
            self.last_inverse_step = self.steps

    def _learning_rates(self) -> dict[int, float]:
        """Learning rate per parameter id: the schedule ``lr`` or the optimizer's param groups."""
        if self.lr is not None:
            lr = evaluate(self.lr, self.steps)
            assert lr is not None
            return {id(layer.adapter.weight): lr for layer in self.layers.values()}
        assert self.optimizer is not None
        return {
            id(p): float(group["lr"])
            for group in self.optimizer.param_groups
            for p in group["params"]
        }

    def precondition(self, *, grad_scale: float | Tensor = 1.0) -> None:
        """Replace each registered layer's gradient by its preconditioned, KL-clipped version."""
        damping = evaluate(self.damping, self.steps)
        assert damping is not None
        items = [
            (layer, gradient)
            for layer in self.layers.values()
            if (gradient := layer.adapter.gradient_matrix()) is not None
        ]
        results = self.distributor.precondition(
            items, lambda layer, grad: layer.precondition(grad, self.compute_method, damping)
        )
        pairs = [
            (layer, gradient, preconditioned)
            for (layer, gradient), preconditioned in zip(items, results, strict=True)
            if preconditioned is not None
        ]
        kl_clip = evaluate(self.kl_clip, self.steps)
        scale: Tensor | None = None
        if kl_clip is not None and pairs:
            rates = self._learning_rates()
            scale = linalg.kl_clip_scale(
                [p for _, _, p in pairs],
                [g for _, g, _ in pairs],
                [rates.get(id(layer.adapter.weight), 0.0) for layer, _, _ in pairs],
                kl_clip,
                grad_scale,
            )
        for layer, _, preconditioned in pairs:
            if scale is not None:
                preconditioned = preconditioned * scale.to(preconditioned)
            layer.adapter.set_gradient_matrix(preconditioned)
        self.last_step_info.update(
            damping=damping, kl_clip=kl_clip, kl_scale=scale, preconditioned_layers=len(pairs)
        )

    # -- faults ----------------------------------------------------------------------------
    def _report(self, key: str, message: str, *, expected: bool = False) -> None:
        """Warn once per fault key; faults an AMP scaler explains are logged, not warned."""
        if key in self._reported:
            return
        self._reported.add(key)
        if expected:
            log.debug(message)
        else:
            warnings.warn(message, KFACNumericalWarning, stacklevel=3)

    # -- persistence -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Factors (running averages) and counters; see ``KroneckerFactor.state_dict``."""
        return {
            "steps": self.steps,
            "last_inverse_step": self.last_inverse_step,
            "layers": {
                name: {"A": layer.a.state_dict(), "G": layer.g.state_dict()}
                for name, layer in self.layers.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore factors and counters, then recompute the decompositions that were not saved.

        The decompositions are recomputed from the loaded factors with the damping of the last
        inverse-update step, so a resumed run continues exactly as the uninterrupted one.
        """
        saved, expected = set(state["layers"]), set(self.layers)
        if saved != expected:
            raise ValueError(
                "K-FAC state does not match the registered layers: "
                f"missing {sorted(expected - saved)}, unexpected {sorted(saved - expected)}"
            )
        for name, layer in self.layers.items():
            device = layer.adapter.weight.device
            for side, factor in zip("AG", layer.factors, strict=True):
                factor.load_state_dict(state["layers"][name][side])
                factor.to(device)
        self.steps = int(state["steps"])
        self.last_inverse_step = state["last_inverse_step"]
        missing = [
            layer
            for layer in self.layers.values()
            if layer.has_factors
            and (layer.a.decomposition is None or layer.g.decomposition is None)
        ]
        if missing and self.last_inverse_step is not None:
            current = self.steps
            self.steps = self.last_inverse_step  # schedules evaluated as on that step
            try:
                self.update_decompositions(only_missing=True)
            finally:
                self.steps = current
