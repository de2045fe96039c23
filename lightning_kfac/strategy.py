"""KFACDDPStrategy: distributed K-FAC on top of Lightning's DDPStrategy.

This module is the one place that knows Lightning's call order. Per optimizer step:

1. **Capture.** During the closure (``training_step`` → ``zero_grad`` → backward) the
   preconditioner's module hooks capture activations and output gradients, on factor-update
   steps only and only while ``module.training`` with gradients enabled (never in validation,
   test or predict). With ``accumulate_grad_batches = K`` the capture sums over the K
   micro-batches (Lightning divides each loss by K; the preconditioner multiplies it back).
2. **Reduce.** On the last micro-batch (the backward DDP synchronises) each layer's factor batch
   estimates are finalised as soon as its output gradient is captured and go into packed
   (upper-triangle), bucketed, asynchronous all-reduces on a process group of their own, so the
   communication overlaps the rest of the backward pass.
3. **Precondition.** After the closure returns, DDP has averaged the gradients. The strategy waits
   for the factor reduction, updates the running averages, recomputes the eigendecompositions on
   inverse-update steps (each layer on one owner rank chosen by cost, results broadcast — or, with
   ``distribution_mode="broadcast_gradients"``, owners precondition and broadcast the gradients),
   and rewrites every registered layer's gradient.
4. **Lightning continues:** ``on_before_optimizer_step`` hooks, gradient clipping (so clipping
   applies to the *preconditioned* gradient), then the user's optimizer step.

Under ``16-mixed`` the closure's gradients are still multiplied by the GradScaler's scale:
factors divide it out at capture, KL-clip divides it out of ``<P, dW>``, and preconditioning,
being linear, commutes with the unscale that follows. If the gradients are not finite (the scaler
will skip this step) the captured factors are discarded and K-FAC's step counter does not advance.

Manual optimization: K-FAC runs at every ``optimizer.step()`` on the gradients present then (after
``manual_backward``), with ``loss_scale = 1``. One optimizer is supported; for several optimizers
use ``KFACPreconditioner`` directly.

Checkpoints carry the preconditioner's ``state_dict`` under ``"kfac"``; a run resumes exactly
(``broadcast_decompositions`` mode), also on a different number of ranks, since factors are
global averages. In ``broadcast_gradients`` mode rank 0 holds only its own decompositions, so
after a resume between two inverse updates the other layers' decompositions are recomputed from
the saved (newer) factors: training continues correctly but not bit-identically.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_kfac.distributed import DistributionMode, TorchDistributedDistributor
from lightning_kfac.kfac import ComputeMethod, KFACPreconditioner
from lightning_kfac.kfac.options import Schedule

#: Registered strategy names and their ``start_method``.
STRATEGY_NAMES = {"kfac_ddp": "popen", "kfac_ddp_spawn": "spawn", "kfac_ddp_fork": "fork"}


class KFACStrategyMixin:
    """K-FAC behaviour shared by the ``pytorch_lightning`` and ``lightning.pytorch`` classes.

    K-FAC keywords are those of ``KFACPreconditioner`` (the optimizer and the AMP scaler come from
    the Trainer), plus ``distribution_mode`` and ``bucket_cap_mb``; every other keyword goes to
    ``DDPStrategy`` (``start_method``, ``process_group_backend``, ``find_unused_parameters``, …).
    """

    def __init__(
        self,
        *,
        damping: Schedule = 1e-3,
        factor_update_interval: int = 1,
        inverse_update_interval: int = 10,
        factor_decay: Schedule = 0.95,
        kl_clip: Schedule | None = 1e-3,
        lr: Schedule | None = None,
        skip_modules: Iterable[str | type[nn.Module]] = (),
        factor_dtype: torch.dtype | None = None,
        inverse_dtype: torch.dtype | None = None,
        compute_method: ComputeMethod | str = ComputeMethod.EIGEN,
        factor_max_rows: int | None = None,
        distribution_mode: DistributionMode | str = DistributionMode.BROADCAST_DECOMPOSITIONS,
        bucket_cap_mb: float = 25.0,
        log_figures: bool = True,
        **ddp_kwargs: Any,
    ) -> None:
        super().__init__(**ddp_kwargs)  # type: ignore[call-arg]
        self.kfac_options: dict[str, Any] = dict(
            damping=damping,
            factor_update_interval=factor_update_interval,
            inverse_update_interval=inverse_update_interval,
            factor_decay=factor_decay,
            kl_clip=kl_clip,
            lr=lr,
            skip_modules=tuple(skip_modules),
            factor_dtype=factor_dtype,
            inverse_dtype=inverse_dtype,
            compute_method=ComputeMethod(compute_method),
            factor_max_rows=factor_max_rows,
        )
        self.distribution_mode = DistributionMode(distribution_mode)
        self.bucket_cap_bytes = int(bucket_cap_mb * 2**20)
        self.log_figures = log_figures
        #: The preconditioner driving the current ``fit`` (None before ``setup``).
        self.preconditioner: KFACPreconditioner | None = None
        #: Steps skipped because the AMP scaler found non-finite gradients.
        self.skipped_steps = 0

    # -- setup / teardown -------------------------------------------------------------------
    def setup(self, trainer: Any) -> None:
        super().setup(trainer)  # type: ignore[misc]  # wraps the module in DDP, sets up optimizers
        if trainer.state.fn == "fit":
            self._setup_kfac(trainer)

    def _setup_kfac(self, trainer: Any) -> None:
        module = self.lightning_module  # type: ignore[attr-defined]
        optimizers = self.optimizers  # type: ignore[attr-defined]
        if len(optimizers) != 1:
            raise ValueError(
                f"KFACDDPStrategy supports exactly one optimizer, configure_optimizers returned "
                f"{len(optimizers)}; use lightning_kfac.KFACPreconditioner directly for several"
            )
        scaler = getattr(self.precision_plugin, "scaler", None)  # type: ignore[attr-defined]
        pre = KFACPreconditioner(
            module,
            optimizer=optimizers[0],
            grad_scaler=scaler,
            report_registration=self.global_rank == 0,  # type: ignore[attr-defined]
            **self.kfac_options,
        )
        pre.loss_scale = (
            1.0 / trainer.accumulate_grad_batches if module.automatic_optimization else 1.0
        )
        pre.profile = trainer.profiler.profile
        pre.is_final_backward = lambda: bool(
            getattr(self.model, "require_backward_grad_sync", True)
        )  # type: ignore[attr-defined]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            group = dist.new_group(backend=dist.get_backend())
            pre.distributor = TorchDistributedDistributor(
                list(pre.layers.values()),
                method=pre.compute_method,
                inverse_dtype=pre.inverse_dtype,
                group=group,
                mode=self.distribution_mode,
                bucket_cap_bytes=self.bucket_cap_bytes,
            )
        self.preconditioner = pre
        self.skipped_steps = 0

    def teardown(self) -> None:
        if self.preconditioner is not None:
            self.preconditioner.remove_hooks()
        super().teardown()  # type: ignore[misc]

    # -- the step ---------------------------------------------------------------------------
    def optimizer_step(
        self,
        optimizer: torch.optim.Optimizer,
        closure: Callable[[], Any],
        model: Any = None,
        **kwargs: Any,
    ) -> Any:
        if self.preconditioner is None:
            return super().optimizer_step(optimizer, closure, model, **kwargs)  # type: ignore[misc]

        def closure_then_kfac() -> Any:
            result = closure()
            self._kfac_step(result)
            return result

        return super().optimizer_step(optimizer, closure_then_kfac, model, **kwargs)  # type: ignore[misc]

    def _kfac_step(self, closure_result: Any) -> None:
        pre = self.preconditioner
        assert pre is not None
        module = self.lightning_module  # type: ignore[attr-defined]
        if module.automatic_optimization and closure_result is None:
            pre.discard_captured()  # training_step returned None: Lightning skips the step
            return
        grad_scale: float | torch.Tensor = 1.0
        scaler = pre.grad_scaler
        if scaler is not None and scaler.is_enabled():
            if not _gradients_finite(module):
                pre.discard_captured()  # the scaler will skip this step: so does K-FAC
                self.skipped_steps += 1
                return
            grad_scale = scaler.get_scale()
        pre.step(grad_scale=grad_scale)
        if self.log_figures:
            self._log_figures(pre)

    def _log_figures(self, pre: KFACPreconditioner) -> None:
        info = pre.last_step_info
        figures: dict[str, Any] = {"kfac/damping": float(info["damping"])}
        if info.get("kl_scale") is not None:
            figures["kfac/kl_scale"] = info["kl_scale"]
        for stage in ("factors", "inverses", "precondition"):
            figures[f"kfac/{stage}_time_ms"] = 1000.0 * info.get(f"{stage}_time", 0.0)
        distributor = pre.distributor
        if isinstance(distributor, TorchDistributedDistributor):
            figures["kfac/bytes_communicated"] = float(distributor.bytes_communicated)
            distributor.reset_counters()
        else:
            figures["kfac/bytes_communicated"] = 0.0
        figures["kfac/amp_skipped_steps"] = float(self.skipped_steps)
        module = self.lightning_module  # type: ignore[attr-defined]
        for name, value in figures.items():
            module.log(name, value, on_step=True, on_epoch=False, batch_size=1)

    # -- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None
    ) -> None:
        if self.preconditioner is not None:
            checkpoint["kfac"] = self.preconditioner.state_dict()
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)  # type: ignore[misc]

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        super().load_optimizer_state_dict(checkpoint)  # type: ignore[misc]
        if self.preconditioner is not None and "kfac" in checkpoint:
            self.preconditioner.load_state_dict(checkpoint["kfac"])


def _gradients_finite(module: nn.Module) -> bool:
    """One host sync: are all gradients finite (what the GradScaler is about to check)?"""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def build_strategy_class(ddp_strategy: type, registry: Any) -> type:
    """Create ``KFACDDPStrategy`` for one Lightning package and register its names there.

    ``pytorch_lightning`` and ``lightning.pytorch`` are separate class hierarchies with separate
    registries, so each gets its own subclass of its own ``DDPStrategy``. Registering again
    (re-import, the popen launcher's children) overrides harmlessly.
    """
    strategy_class = type(
        "KFACDDPStrategy",
        (KFACStrategyMixin, ddp_strategy),
        {"__doc__": KFACStrategyMixin.__doc__, "__module__": __name__},
    )
    for name, start_method in STRATEGY_NAMES.items():
        registry.register(
            name,
            strategy_class,
            description=f"K-FAC on DDP with start_method '{start_method}'",
            override=True,
            start_method=start_method,
        )
    return strategy_class
