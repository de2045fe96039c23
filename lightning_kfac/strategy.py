"""K-FAC on Lightning's DDPStrategy: the one place that knows Lightning's call order.

``KFACStrategyMixin`` holds the behaviour; ``lightning_kfac.pytorch_lightning.KFACDDPStrategy``
and ``lightning_kfac.lightning.KFACDDPStrategy`` are the classes, one per Lightning namespace
(``pytorch_lightning`` and ``lightning.pytorch`` are separate class hierarchies with separate
registries). Per optimizer step:

1. **Capture.** During the closure (``training_step`` → ``zero_grad`` → backward) the
   preconditioner's tracer captures what each use of a parameter needs, on factor-update steps
   only and only in training forwards (never in validation, test or predict). Lightning calls
   ``training_step`` through the LightningModule's ``__call__``, so its forward hooks mark each
   micro-batch and its batch size. With ``accumulate_grad_batches = K`` the capture sums over
   the K micro-batches (Lightning divides each loss by K; the preconditioner multiplies it back).
2. **Reduce.** On the last micro-batch (the backward DDP synchronises) each block's sums go into
   packed, bucketed, asynchronous all-reduces on a process group of their own (created with the
   strategy's ``timeout``) as soon as its capture completes, overlapping the backward pass.
3. **Precondition.** After the closure returns, DDP has averaged the gradients. The
   preconditioner updates the running averages, recomputes the decompositions on inverse-update
   steps (each block on one owner rank, results broadcast — or, with
   ``distribution_mode="broadcast_gradients"``, owners precondition and broadcast the gradients)
   and rewrites every preconditioned gradient.
4. **Lightning continues:** ``on_before_optimizer_step`` hooks, gradient clipping (so clipping
   applies to the *preconditioned* gradient), then the user's optimizer step.

Under ``16-mixed`` the closure's gradients are still multiplied by the GradScaler's scale:
factors divide it out at capture, KL-clip divides it out of ``<P, dW>``, and preconditioning,
being linear, commutes with the unscale that follows. If the gradients are not finite (the scaler
will skip this step) the factor update is rejected on the device, with no host synchronisation.

Manual optimization: K-FAC runs at every ``optimizer.step()`` on the gradients present then, with
``loss_scale = 1``. One optimizer is supported; for several use ``KFACPreconditioner`` directly.

Checkpoints carry the preconditioner's ``state_dict`` under ``"kfac"`` (with the K-FAC options it
was saved with); it is validated on load, and every option that differs in the resumed run is
named once with what it means. A run resumes exactly, also on a different number of ranks, since
factors are global averages. A checkpoint without K-FAC state (e.g. from plain DDP) resumes with
fresh factors, said once. A K-FAC checkpoint also holds a marker among the callback states
(``CHECKPOINT_MARKER``): resumed by a Trainer without this strategy (plain ``DDPStrategy``), it
is a callback state nobody claims, and Lightning's own warning ("Please add the following
callbacks: [...]") then names it — the K-FAC state is being dropped. This strategy removes the
marker when it loads a checkpoint.

Calling ``trainer.fit`` again on the same Trainer and LightningModule (a script that fits, looks,
and fits on; each process keeps its strategy, as with the popen launcher, ``torchrun`` or SLURM)
continues K-FAC from where the previous fit stopped: its step counter, factors, decompositions
and counters move to the new fit's preconditioner (Lightning sets the strategy up anew, with new
optimizers), which equals one longer fit. A second ``fit`` with ``ckpt_path`` takes the
checkpoint's K-FAC state instead; a different LightningModule starts K-FAC afresh.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import typing
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_kfac.distributed import TorchDistributedDistributor
from lightning_kfac.kfac import KFACOptions, KFACPreconditioner
from lightning_kfac.kfac import options as options_module
from lightning_kfac.kfac.options import option_names, reject_unknown

log = logging.getLogger(__name__)

#: Registered strategy names and their ``start_method``.
STRATEGY_NAMES = {"kfac_ddp": "popen", "kfac_ddp_spawn": "spawn", "kfac_ddp_fork": "fork"}

#: Key of the marker a K-FAC checkpoint holds among its callback states. A Trainer without this
#: strategy finds no callback claiming it, and Lightning warns "Please add the following
#: callbacks: [<this key>]": the key is written to be read there.
CHECKPOINT_MARKER = (
    "KFACDDPStrategy (lightning_kfac): this checkpoint's K-FAC state (checkpoint['kfac']: factors, "
    "decompositions, step counter) is dropped unless the run resumes with "
    "strategy=lightning_kfac.KFACDDPStrategy(...)"
)


def _accepted_keywords(ddp_strategy: type) -> list[str]:
    """Keywords a ``DDPStrategy`` takes: its own, and ``DistributedDataParallel``'s (forwarded)."""
    names: list[str] = []
    for function in (ddp_strategy.__init__, DistributedDataParallel.__init__):
        for parameter in inspect.signature(function).parameters.values():
            if parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
                names.append(parameter.name)
    return [name for name in dict.fromkeys(names) if name not in ("self", "module")]


class KFACStrategyMixin:
    """K-FAC behaviour shared by the ``pytorch_lightning`` and ``lightning.pytorch`` classes.

    Args:
        options: A ``KFACOptions`` (validated when built). K-FAC keywords given directly
            (``damping=...``, ``inverse_update_interval=...``, every field of ``KFACOptions``)
            override it. Python only: ``LightningCLI`` and YAML configs give the K-FAC
            keywords directly (``--trainer.strategy.damping=...``), which the signature lists.
        log_figures: Log ``kfac/*`` figures through ``LightningModule.log`` every step.
        **kwargs: K-FAC options, and every ``DDPStrategy`` keyword (``start_method``,
            ``process_group_backend``, ``find_unused_parameters``, ``timeout``, …). Anything
            else is rejected here, in the main process, with the closest valid name.
    """

    #: ``rank_zero_info`` of the Lightning namespace (set by the concrete class).
    _rank_zero_info: Callable[[str], None] = staticmethod(log.info)
    #: ``rank_zero_warn`` of the Lightning namespace (set by the concrete class).
    _rank_zero_warn: Callable[[str], None] = staticmethod(log.warning)
    #: The Trainer this class fits, and what to use with the other namespace's Trainer (set by
    #: the concrete class; shown by ``repr``, which Lightning puts in its "invalid strategy" error).
    _fits: str = "a Lightning Trainer"
    _other: str = ""

    def __init__(
        self, options: KFACOptions | None = None, *, log_figures: bool = True, **kwargs: Any
    ) -> None:
        # K-FAC keywords are taken out of ``kwargs``, which then goes on as it is: jsonargparse
        # (LightningCLI) follows ``super().__init__(**kwargs)`` to the DDPStrategy keywords.
        kfac_kwargs = {name: kwargs.pop(name) for name in option_names() if name in kwargs}
        ddp_strategy = next(c for c in type(self).__mro__ if c.__name__ == "DDPStrategy")
        reject_unknown(
            kwargs,
            [*option_names(), *_accepted_keywords(ddp_strategy), "options", "log_figures"],
            where=f"{type(self).__name__}",
            others="besides options= and log_figures=, every DDPStrategy and "
            "DistributedDataParallel keyword is accepted",
        )
        if options is not None and not isinstance(options, KFACOptions):
            raise TypeError(
                f"{type(self).__name__}(options=...) takes a lightning_kfac.KFACOptions, got "
                f"{options!r}; or pass the K-FAC keywords directly (damping=..., ...)"
            )
        #: The validated K-FAC options.
        self.kfac_options = KFACOptions.from_kwargs(options, **kfac_kwargs)
        super().__init__(**kwargs)  # type: ignore[call-arg]
        self.log_figures = log_figures
        #: The preconditioner driving the current ``fit`` (None before ``setup``); after a
        #: ``fit``, the one of the last fit (a next ``fit`` continues from it).
        self.preconditioner: KFACPreconditioner | None = None
        self._reported_table: str | None = None
        self._logged_fraction = False

    def __repr__(self) -> str:
        cls = type(self)
        return (
            f"<{cls.__module__}.{cls.__qualname__}: K-FAC for {cls._fits}"
            + (f"; {cls._other}" if cls._other else "")
            + ">"
        )

    # -- setup / teardown -------------------------------------------------------------------
    @override
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
        previous = self.preconditioner
        # A previous fit of the same module (and no checkpoint to resume instead): continue it.
        # Taken before anything else of this fit, while every rank is here and the previous
        # fit's process group still works (``broadcast_gradients`` gathers decompositions).
        carried = None
        if previous is not None and previous.model is module and not trainer.ckpt_path:
            carried = previous.full_state_dict()
        distributor = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            group = dist.new_group(
                backend=dist.get_backend(),
                timeout=self._timeout,  # type: ignore[attr-defined]
            )
            distributor = TorchDistributedDistributor(
                group=group,
                mode=self.kfac_options.distribution_mode,
                bucket_cap_bytes=int(self.kfac_options.factor_bucket_cap_mb * 2**20),
                device=self.root_device,  # type: ignore[attr-defined]
            )
        self.preconditioner = KFACPreconditioner(
            module,
            options=self.kfac_options,
            optimizer=optimizers[0],
            grad_scaler=getattr(self.precision_plugin, "scaler", None),  # type: ignore[attr-defined]
            distributor=distributor,
            report=self.global_rank == 0,  # type: ignore[attr-defined]
            # Lightning divides each micro-batch's loss by the accumulation count
            loss_scale=(
                1.0 / trainer.accumulate_grad_batches if module.automatic_optimization else 1.0
            ),
            # DDP synchronises on the last micro-batch only
            is_final_backward=lambda: bool(
                getattr(self.model, "require_backward_grad_sync", True)  # type: ignore[attr-defined]
            ),
            profile=trainer.profiler.profile,
        )
        if carried is not None:
            assert previous is not None
            self._continue_from(previous, carried)
        else:
            self._reported_table = None
            self._logged_fraction = False

    def _continue_from(self, previous: KFACPreconditioner, carried: dict[str, Any]) -> None:
        """The new fit's preconditioner takes over the previous fit's state: what a checkpoint
        resume restores (factors, decompositions, step counter, sampling generators), plus the
        device-side fault counters and the warnings already given."""
        pre = self.preconditioner
        assert pre is not None
        pre.load_state_dict(carried)
        pre.nonfinite_steps = previous.nonfinite_steps
        pre.amp_skipped_steps = previous.amp_skipped_steps
        pre.faults = previous.faults
        if self.global_rank == 0:  # type: ignore[attr-defined]
            type(self)._rank_zero_info(
                f"K-FAC continues from step {pre.steps} of the previous fit of this model "
                "(factors, decompositions and step counter carried over)"
            )

    @override
    def teardown(self) -> None:
        if self.preconditioner is not None:
            self.preconditioner.remove_hooks()
        super().teardown()  # type: ignore[misc]

    # -- the step ---------------------------------------------------------------------------
    @override
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
            scale = getattr(scaler, "_scale", None)  # a tensor: no host sync
            grad_scale = scale if isinstance(scale, torch.Tensor) else scaler.get_scale()
        pre.step(grad_scale=grad_scale)
        if pre.structure is not None:
            self._report_structure(pre)
        if self.log_figures:
            self._log_figures(pre)

    def _report_structure(self, pre: KFACPreconditioner) -> None:
        """The coverage table on rank 0 when it is new or changed (a structure traced again, a
        continued fit with another table), and the preconditioned fraction once per run."""
        structure = pre.structure
        assert structure is not None
        trainer = self.lightning_module.trainer  # type: ignore[attr-defined]
        if self.global_rank == 0:  # type: ignore[attr-defined]
            table = pre.coverage_report()
            if table != self._reported_table:
                self._reported_table = table
                self._print(trainer, table)
        if not self._logged_fraction and self.log_figures:
            self._logged_fraction = True
            # Once, straight to the loggers (``self.log`` would repeat it at every log step).
            for logger in trainer.loggers:
                logger.log_metrics(
                    {"kfac/preconditioned_fraction": structure.preconditioned_fraction},
                    step=trainer.global_step,
                )

    def _print(self, trainer: Any, text: str) -> None:
        """Through the progress bar's own printing while one is shown (a bar redraws itself
        around the text instead of the text landing in the middle of its line); else as info."""
        bar = getattr(trainer, "progress_bar_callback", None)
        if bar is not None and bar.is_enabled:
            bar.print(text)
        else:
            type(self)._rank_zero_info(text)

    def _log_figures(self, pre: KFACPreconditioner) -> None:
        record = pre.last_step
        assert record is not None
        figures: dict[str, Any] = {"kfac/damping": float(record.damping)}
        if record.kl_scale is not None:
            figures["kfac/kl_scale"] = record.kl_scale.to(torch.float32)
        for stage in ("factors", "inverses", "precondition"):
            figures[f"kfac/{stage}_time_ms"] = 1000.0 * record.seconds.get(stage, 0.0)
        distributor = pre.distributor
        if isinstance(distributor, TorchDistributedDistributor):
            # float64: Lightning keeps a Python float as float32, exact only below 2**24 bytes.
            figures["kfac/bytes_communicated"] = torch.tensor(
                float(distributor.bytes_communicated), dtype=torch.float64
            )
            distributor.reset_counters()
        else:
            figures["kfac/bytes_communicated"] = 0.0
        for name, counter in (
            ("kfac/amp_skipped_steps", pre.amp_skipped_steps),
            ("kfac/nonfinite_skipped_steps", pre.nonfinite_steps),
        ):
            figures[name] = counter.to(torch.float32) if counter is not None else torch.zeros(())
        module = self.lightning_module  # type: ignore[attr-defined]
        for name, value in figures.items():
            module.log(name, value, on_step=True, on_epoch=False, batch_size=1)

    # -- checkpoints ------------------------------------------------------------------------
    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None
    ) -> None:
        if self.preconditioner is not None:
            checkpoint["kfac"] = self.preconditioner.full_state_dict()  # every rank calls it
            callbacks = checkpoint.get("callbacks")
            if isinstance(callbacks, dict):  # a full checkpoint (not weights_only)
                callbacks[CHECKPOINT_MARKER] = {"steps": self.preconditioner.steps}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)  # type: ignore[misc]

    @override
    def load_checkpoint(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Lightning's loading, without ``CHECKPOINT_MARKER``: this strategy claims the K-FAC
        state, so Lightning has no callback state to warn about."""
        checkpoint = super().load_checkpoint(*args, **kwargs)  # type: ignore[misc]
        callbacks = checkpoint.get("callbacks") if isinstance(checkpoint, dict) else None
        if isinstance(callbacks, dict):
            callbacks.pop(CHECKPOINT_MARKER, None)
        return checkpoint

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        super().load_optimizer_state_dict(checkpoint)  # type: ignore[misc]
        if self.preconditioner is None:
            return
        if "kfac" in checkpoint:
            self.preconditioner.load_state_dict(checkpoint["kfac"])
        else:
            type(self)._rank_zero_warn(
                "The checkpoint has no K-FAC state (saved without KFACDDPStrategy?): K-FAC starts "
                "with fresh factors; the model and optimizer states are resumed"
            )

    # -- registration -----------------------------------------------------------------------
    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        """Register ``kfac_ddp``, ``kfac_ddp_spawn`` and ``kfac_ddp_fork`` (as Lightning's own
        strategies do; registering again, e.g. in the popen launcher's children, overrides)."""
        for name, start_method in STRATEGY_NAMES.items():
            strategy_registry.register(
                name,
                cls,
                description=f"K-FAC on DDP with start_method '{start_method}'",
                override=True,
                start_method=start_method,
            )


def _signature() -> inspect.Signature:
    """``KFACStrategyMixin.__init__``'s signature as tools read it (``inspect.signature``,
    jsonargparse for ``LightningCLI``): every ``KFACOptions`` field as a typed keyword with its
    default, then ``log_figures`` and ``**kwargs`` (the DDPStrategy keywords, which jsonargparse
    finds through ``super().__init__(**kwargs)``). ``options=`` is left out: from a command line
    or config, the fields are given directly (given both ways, the fields would override it)."""
    hints = typing.get_type_hints(KFACOptions, vars(options_module))
    defaults = KFACOptions()
    keyword = inspect.Parameter.KEYWORD_ONLY
    parameters = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    parameters += [
        inspect.Parameter(
            field.name, keyword, default=getattr(defaults, field.name), annotation=hints[field.name]
        )
        for field in dataclasses.fields(KFACOptions)
    ]
    parameters.append(inspect.Parameter("log_figures", keyword, default=True, annotation=bool))
    parameters.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD, annotation=Any))
    return inspect.Signature(parameters, return_annotation=None)


KFACStrategyMixin.__init__.__signature__ = _signature()  # type: ignore[attr-defined]
