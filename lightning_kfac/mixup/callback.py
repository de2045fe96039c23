"""``MixupCallback``: mixup / CutMix for an unmodified LightningModule.

What it does to each training batch, what it validates and what it guarantees is the contract in
:mod:`lightning_kfac.mixup`. Mechanism: ``setup`` wraps ``pl_module.training_step`` on the
instance (the class is untouched) so that each training batch reaches it mixed; ``teardown``
removes the wrapper. The draws come from :mod:`~lightning_kfac.mixup.sampling`, the mixed inputs
from :mod:`~lightning_kfac.mixup.inputs`, the labels from :mod:`~lightning_kfac.mixup.labels`.
This is the only module of the package that needs ``pytorch_lightning``.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from lightning_kfac.mixup.inputs import cutmix_inputs_and_mask, mix_inputs
from lightning_kfac.mixup.labels import SUPPORTED_FORMS, MixedLabels, mix_soft_targets
from lightning_kfac.mixup.sampling import real_as_float, sample_lambdas, sample_permutation


def _real(name: str, value: Any, *, fix: str) -> float:
    """``value`` as a finite float, else a ``TypeError`` / ``ValueError`` naming the option."""
    number = real_as_float(value)
    if number is None:
        raise TypeError(f"MixupCallback({name}={value!r}): {name} must be a real number; {fix}")
    if not math.isfinite(number):
        raise ValueError(f"MixupCallback({name}={value!r}): {name} must be finite; {fix}")
    return number


def _target_layout(targets: Tensor) -> tuple[bool, tuple[int, ...], bool]:
    """``(floating, per_element, dense)`` of a label batch: float targets carry a class dimension
    (``[N, C, *]``), integer labels do not (``[N, *]``); ``per_element`` is the shape of one
    sample's labels without it, and ``dense`` says a sample has more than one label (segmentation).
    """
    floating = targets.is_floating_point()
    per_element = tuple(targets.shape[2:] if floating else targets.shape[1:])
    return floating, per_element, math.prod(per_element) > 1


def _check_alpha(name: str, value: Any, switches_off: str) -> float:
    fix = (
        f"λ ~ Beta({name}, {name}) needs a finite {name} >= 0 (typical 0.2 to 1; 0 switches "
        f"{switches_off} off)"
    )
    number = _real(name, value, fix=fix)
    if number < 0:
        raise ValueError(f"MixupCallback({name}={value!r}): {fix}")
    return number


def _check_fraction(name: str, value: Any, *, below_one: bool = False, fix: str) -> float:
    number = _real(name, value, fix=fix)
    if not (0.0 <= number < 1.0 if below_one else 0.0 <= number <= 1.0):
        interval = "[0, 1)" if below_one else "[0, 1]"
        raise ValueError(f"MixupCallback({name}={value!r}): {name} must be in {interval}; {fix}")
    return number


def _check_count(name: str, value: Any, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(
            f"MixupCallback({name}={value!r}): {name} must be a whole number >= 0; {fix}"
        )
    return int(value)


def _check_index(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"MixupCallback({name}={value!r}): {name} must be an int position in list/tuple batches"
        )
    return int(value)


class MixupCallback(pl.Callback):
    """Mixup (Zhang et al. 2018) / CutMix (Yun et al. 2019) for any classification module.

    Args:
        alpha: λ ~ Beta(α, α) for mixup; finite and ≥ 0, 0 disables mixup (CutMix only). Tiny α
            gives λ ∈ {0, 1} (a fair coin: the α → 0 limit), huge α gives λ ≈ 1/2; see
            ``lightning_kfac.mixup.sampling.sample_beta``. Mixup needs float inputs.
        per_sample: Draw one λ per sample instead of one per batch.
        cutmix_alpha: λ ~ Beta(α, α) for CutMix; finite and ≥ 0, 0 (default) disables CutMix.
            CutMix needs ``[N, C, H, W]`` images (integer images are fine).
        switch_prob: With both enabled, probability that a batch uses CutMix instead of mixup.
            In ``[0, 1]``.
        prob: Probability of mixing a batch at all. In ``[0, 1]``.
        label_smoothing: ε applied to the mixed targets (a loss call's own nonzero
            ``label_smoothing`` takes precedence). In ``[0, 1)``.
        off_last_epochs: No mixing in the final this many epochs of ``max_epochs`` (int ≥ 0).
        off_last_steps: No mixing in the final this many optimizer steps of the run (int ≥ 0).
        running: "Running mixup" (Osawa et al. 2019): mix each batch with the previous *mixed*
            batch (inputs and soft targets) instead of a permutation of itself. The first batch,
            and any batch whose size differs from the previous one, uses a permutation. Needs
            one integer label per sample, or float targets.
        running_max_lambda: With ``running``, use ``λ = max(λ, 1 − λ)`` per sample, so the new batch
            dominates (the recipe's choice).
        input_index, target_index: Positions in list/tuple batches (distinct ints).
        input_key, target_key: Keys in mapping batches (distinct).
        seed: Base seed (int); default Lightning's global seed (``PL_GLOBAL_SEED``) or 0.
        log_stats: Log ``mixup/lambda_mean``, ``mixup/lambda_min``, ``mixup/applied``,
            ``mixup/cutmix`` each step.

    Raises:
        TypeError, ValueError: In the constructor, for a non-finite, negative or out-of-range
            numeric option (the message names the option and what it must be); at the first
            batch, for integer or bool inputs with mixup on, CutMix on non-image inputs, dense
            targets whose size does not match the images under CutMix, and dense integer labels
            with ``running``.
    """

    def __init__(
        self,
        alpha: float = 0.4,
        *,
        per_sample: bool = False,
        cutmix_alpha: float = 0.0,
        switch_prob: float = 0.5,
        prob: float = 1.0,
        label_smoothing: float = 0.0,
        off_last_epochs: int = 0,
        off_last_steps: int = 0,
        running: bool = False,
        running_max_lambda: bool = True,
        input_index: int = 0,
        target_index: int = 1,
        input_key: str = "x",
        target_key: str = "y",
        seed: int | None = None,
        log_stats: bool = True,
    ) -> None:
        alpha = _check_alpha("alpha", alpha, "mixup")
        cutmix_alpha = _check_alpha("cutmix_alpha", cutmix_alpha, "CutMix")
        if alpha == 0 and cutmix_alpha == 0:
            raise ValueError(
                "alpha and cutmix_alpha are both 0: nothing to mix; set alpha > 0 (mixup) and/or "
                "cutmix_alpha > 0 (CutMix), or drop the callback"
            )
        switch_prob = _check_fraction(
            "switch_prob", switch_prob, fix="the probability that a batch uses CutMix"
        )
        prob = _check_fraction("prob", prob, fix="the probability that a batch is mixed at all")
        label_smoothing = _check_fraction(
            "label_smoothing", label_smoothing, below_one=True, fix="ε of (1 − ε) t + ε / C"
        )
        off_last_epochs = _check_count(
            "off_last_epochs", off_last_epochs, "the number of final epochs without mixing"
        )
        off_last_steps = _check_count(
            "off_last_steps", off_last_steps, "the number of final steps without mixing"
        )
        input_index = _check_index("input_index", input_index)
        target_index = _check_index("target_index", target_index)
        if input_index == target_index:
            raise ValueError(
                f"MixupCallback(input_index={input_index}, target_index={target_index}): inputs "
                "and targets must be different batch elements"
            )
        if input_key == target_key:
            raise ValueError(
                f"MixupCallback(input_key={input_key!r}, target_key={target_key!r}): inputs and "
                "targets must be different batch entries"
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"MixupCallback(seed={seed!r}): seed must be an int or None")
        self.alpha = alpha
        self.per_sample = per_sample
        self.cutmix_alpha = cutmix_alpha
        self.switch_prob = (
            switch_prob if alpha > 0 and cutmix_alpha > 0 else float(cutmix_alpha > 0)
        )
        self.prob = prob
        self.label_smoothing = label_smoothing
        self.off_last_epochs = off_last_epochs
        self.off_last_steps = off_last_steps
        self.running = running
        self.running_max_lambda = running_max_lambda
        self.input_index, self.target_index = input_index, target_index
        self.input_key, self.target_key = input_key, target_key
        self.seed = seed
        self.log_stats = log_stats
        self.generator: torch.Generator | None = None
        self._pending_state: dict[str, Any] | None = None
        self._original_step: Any = None
        self._previous: tuple[Tensor, Tensor] | None = None  # running mixup: inputs, soft targets
        #: What the last mixed batch used (for inspection and tests).
        self.last: dict[str, Any] = {}

    # -- lifecycle --------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        base = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        # manual_seed takes 64-bit seeds and wraps negative ones modulo 2^64: do the same for all
        self.generator = torch.Generator().manual_seed(
            (base * 1_000_003 + trainer.global_rank) % 2**64
        )
        if self._pending_state is not None:
            self.generator.set_state(self._pending_state["generator"])
            self._pending_state = None
        self._previous = None
        original = pl_module.training_step
        self._original_step = original

        def training_step(batch: Any, *args: Any, **kwargs: Any) -> Any:
            return original(self._maybe_mix(batch, trainer, pl_module), *args, **kwargs)

        pl_module.training_step = training_step  # type: ignore[method-assign]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._original_step is not None:
            if "training_step" in vars(pl_module):
                del pl_module.training_step  # back to the class's method
            self._original_step = None

    def state_dict(self) -> dict[str, Any]:
        return {} if self.generator is None else {"generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "generator" not in state_dict:
            return
        if self.generator is None:
            self._pending_state = dict(state_dict)
        else:
            self.generator.set_state(state_dict["generator"])

    # -- decisions --------------------------------------------------------------------------
    def _scheduled_off(self, trainer: pl.Trainer) -> bool:
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
        if (
            self.off_last_epochs > 0
            and 0 < max_epochs <= trainer.current_epoch + self.off_last_epochs
        ):
            return True
        if self.off_last_steps:
            total = (
                trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
            )
            if trainer.global_step >= total - self.off_last_steps:
                return True
        return False

    def _uniform(self) -> float:
        assert self.generator is not None
        return float(torch.rand((), generator=self.generator, dtype=torch.float64))

    # -- the mixing ------------------------------------------------------------------------
    def _maybe_mix(self, batch: Any, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        inputs, targets, rebuild = self._unpack(batch)
        self._check_batch(inputs, targets)
        # Draw the coin every step (even when the schedule is off) so the sequence does not
        # depend on the schedule.
        apply = self._uniform() < self.prob and not self._scheduled_off(trainer)
        use_cutmix = self._uniform() < self.switch_prob
        if not apply:
            self.last = {"applied": False}
            self._previous = None
            self._log(pl_module, None, applied=False, cutmix=False)
            return batch
        mixed_inputs, mixed_targets, lam = self._mix(inputs, targets, use_cutmix)
        self._log(pl_module, lam, applied=True, cutmix=use_cutmix)
        return rebuild(mixed_inputs, mixed_targets)

    def _check_batch(self, inputs: Tensor, targets: Tensor) -> None:
        """Refuse, at every batch (so at the first), what some batch would mix wrongly."""
        if self.alpha > 0 and not (inputs.is_floating_point() or inputs.is_complex()):
            raise TypeError(
                f"MixupCallback: mixup mixes float inputs, got {inputs.dtype} inputs of shape "
                f"{tuple(inputs.shape)}. λ x + (1 − λ) x_π on integers (token ids, raw uint8 "
                "images) would be truncated to one of the two samples while the loss keeps both "
                "labels. Token ids: mix embeddings inside the model instead (this callback "
                "cannot). Images: convert them to float in the dataset / collate_fn. CutMix "
                "alone (alpha=0, cutmix_alpha > 0) copies pixels and accepts integer images."
            )
        floating, per_element, dense = _target_layout(targets)
        if self.cutmix_alpha > 0:
            if inputs.dim() != 4:
                raise ValueError(
                    "MixupCallback: CutMix (cutmix_alpha > 0) needs image batches [N, C, H, W], "
                    f"got inputs of shape {tuple(inputs.shape)}; use alpha only (mixup)"
                )
            if dense and per_element != tuple(inputs.shape[-2:]):
                expected = "[N, C, H, W]" if floating else "[N, H, W]"
                raise ValueError(
                    f"MixupCallback: CutMix pastes boxes of pixels, so dense targets must be "
                    f"{expected} with the images' H x W = {tuple(inputs.shape[-2:])} (each pixel "
                    f"then takes its label from the image it came from); got targets of shape "
                    f"{tuple(targets.shape)}. Per-sample targets are [N] (labels) or [N, C]."
                )
        if self.running and dense and not floating:
            raise ValueError(
                "MixupCallback(running=True) mixes with the previous batch's per-sample soft "
                f"targets and needs one integer label per sample; got labels of shape "
                f"{tuple(targets.shape)}. Use running=False, or float targets."
            )

    def _mix(self, inputs: Tensor, targets: Tensor, use_cutmix: bool) -> tuple[Tensor, Any, Tensor]:
        assert self.generator is not None
        count = inputs.shape[0]
        alpha = self.cutmix_alpha if use_cutmix else self.alpha
        lam = sample_lambdas(alpha, count, self.generator, per_sample=self.per_sample)
        permutation = sample_permutation(count, self.generator)
        previous = self._previous if self.running else None
        if previous is not None and previous[0].shape != inputs.shape:
            previous = None
        if self.running and self.running_max_lambda:
            lam = torch.maximum(lam, 1 - lam)
        device_perm = permutation.to(inputs.device)
        partner_inputs = previous[0] if previous is not None else inputs[device_perm]
        floating, _, dense = _target_layout(targets)
        if use_cutmix:
            mixed_inputs, lam, inside = cutmix_inputs_and_mask(
                inputs, partner_inputs, lam, self.generator
            )
            # dense targets: each pixel's λ is 1 where it kept its own image, 0 in the box
            target_lam = (~inside).double() if dense else lam
        else:
            mixed_inputs = mix_inputs(inputs, partner_inputs, lam)
            target_lam = lam
        self.last = {
            "applied": True,
            "cutmix": use_cutmix,
            "lam": lam.clone(),
            "permutation": None if previous is not None else permutation,
            "running": previous is not None,
        }
        if floating:  # soft or one-hot targets: mixed directly
            partner = previous[1] if previous is not None else targets[device_perm]
            soft = mix_soft_targets(targets, partner.to(targets), target_lam)
            if self.running:
                self._previous = (mixed_inputs.detach(), soft.detach())
            if self.label_smoothing:
                soft = (1 - self.label_smoothing) * soft + self.label_smoothing / soft.shape[1]
            return mixed_inputs, soft, lam
        if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(
                f"MixupCallback needs integer class labels or float targets, got {targets.dtype}"
            )
        record = self._record_running(mixed_inputs) if self.running else None
        if previous is not None:
            labels = MixedLabels(
                targets,
                target_lam,
                soft_partner=previous[1],
                label_smoothing=self.label_smoothing,
                on_soft_targets=record,
            )
        else:
            labels = MixedLabels(
                targets,
                target_lam,
                labels_b=targets[device_perm],
                label_smoothing=self.label_smoothing,
                on_soft_targets=record,
            )
        return mixed_inputs, labels, lam

    def _record_running(self, mixed_inputs: Tensor) -> Any:
        def record(soft_targets: Tensor) -> None:
            self._previous = (mixed_inputs.detach(), soft_targets)

        return record

    # -- batches ----------------------------------------------------------------------------
    def _unpack(self, batch: Any) -> tuple[Tensor, Tensor, Any]:
        if isinstance(batch, Mapping):
            keys = (self.input_key, self.target_key)
            missing = [k for k in keys if k not in batch]
            if missing:
                raise KeyError(
                    f"MixupCallback: batch has keys {sorted(batch)}, missing {missing}; set "
                    "MixupCallback(input_key=..., target_key=...)"
                )
            inputs, targets = batch[self.input_key], batch[self.target_key]

            def rebuild(x: Tensor, y: Any) -> Any:
                out = dict(batch)
                out[self.input_key], out[self.target_key] = x, y
                return type(batch)(out) if type(batch) is not dict else out

        elif isinstance(batch, (list, tuple)):
            if max(self.input_index, self.target_index) >= len(batch):
                raise IndexError(
                    f"MixupCallback: batch has {len(batch)} elements; set input_index/target_index"
                )
            inputs, targets = batch[self.input_index], batch[self.target_index]

            def rebuild(x: Tensor, y: Any) -> Any:
                items = list(batch)
                items[self.input_index], items[self.target_index] = x, y
                if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
                    return type(batch)(*items)
                return type(batch)(items)

        else:
            raise TypeError(
                f"MixupCallback cannot find inputs and targets in a batch of type "
                f"{type(batch).__name__}: use (inputs, targets) lists/tuples or a mapping with "
                "input_key/target_key"
            )
        if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
            raise TypeError(
                "MixupCallback: inputs and targets must be tensors, got "
                f"{type(inputs).__name__} and {type(targets).__name__}"
            )
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(
                f"MixupCallback: {inputs.shape[0]} inputs but {targets.shape[0]} targets; check "
                "input_index/target_index or input_key/target_key"
            )
        return inputs, targets, rebuild

    def _log(
        self, pl_module: pl.LightningModule, lam: Tensor | None, *, applied: bool, cutmix: bool
    ) -> None:
        if not self.log_stats:
            return
        figures = {"mixup/applied": float(applied), "mixup/cutmix": float(applied and cutmix)}
        if lam is not None:
            figures["mixup/lambda_mean"] = float(lam.mean())
            figures["mixup/lambda_min"] = float(lam.min())
        for name, value in figures.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1)


__all__ = ["SUPPORTED_FORMS", "MixupCallback"]
