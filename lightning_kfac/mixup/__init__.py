"""Mixup and CutMix for an unmodified ``training_step`` — the contract (written here only).

Mixup (Zhang et al. 2018) trains on ``x̃_i = λ_i x_i + (1 − λ_i) x_π(i)`` with the loss
``λ_i CE(f(x̃_i), y_i) + (1 − λ_i) CE(f(x̃_i), y_π(i))``; CutMix (Yun et al. 2019) pastes a box of
``x_π(i)`` into ``x_i`` and sets ``λ_i`` to the kept area. Large-batch K-FAC generalizes worse
unless the loss is smoothed; mixup closes that gap (Naganuma & Yokota, CCGRID 2019).

The package, one job per module (all pure torch except the callback):

- :mod:`~lightning_kfac.mixup.sampling`: ``λ ~ Beta(α, α)`` and the partner permutation;
- :mod:`~lightning_kfac.mixup.inputs`: mixing and CutMix of input batches;
- :mod:`~lightning_kfac.mixup.labels`: ``MixedLabels``, the exact mixed cross-entropy,
  ``MixupLossError``;
- :mod:`~lightning_kfac.mixup.callback`: ``MixupCallback``, the only module that needs
  ``pytorch_lightning`` (imported when ``MixupCallback`` is first used).

What ``MixupCallback`` does to a batch
--------------------------------------
``MixupCallback`` brings mixup to a LightningModule **without touching its** ``training_step``
(it wraps the method on the instance; the class is untouched). Only training is mixed:
validation, test and predict never see mixed data. Each training batch arrives with

- mixed inputs ``λx + (1−λ)x_π`` (or a CutMix paste of ``x_π``);
- integer labels as ``MixedLabels``: an integer tensor whose values are each element's dominant
  label (``y`` if ``λ ≥ 1/2`` else ``y_π``) and which carries both label sets and ``λ`` per
  element (a per-sample ``λ_i`` is broadcast over the sample's trailing label dimensions, e.g.
  the ``T`` tokens of a sequence);
- float (soft / one-hot) targets mixed directly.

Batches may be lists, tuples (custom ``collate_fn``, namedtuples; ``input_index`` /
``target_index``, default 0 / 1) or dicts (``input_key`` / ``target_key``).

What the labels guarantee
-------------------------
- ``F.cross_entropy(logits, y)`` / ``nn.CrossEntropyLoss(weight=..., label_smoothing=...,
  ignore_index=...)(logits, y)`` return exactly
  ``mean_i[λ_i CE(f(x̃_i), y_i) + (1−λ_i) CE(f(x̃_i), y_π(i))]`` (the weighted generalisation
  with class weights; any reduction).
- Metrics and ``argmax(1) == y`` receive each sample's dominant label — valid integers, never an
  exception or a silently broadcast comparison.
- **The mix follows** ``.long()``, ``.to(torch.long)``, ``.to(device)``, ``.cpu()``,
  ``.clone()``, ``.detach()``, ``.contiguous()``, and every op that only selects or rearranges
  elements (``.view``, ``.reshape``, ``.flatten``, ``.squeeze``, ``.unsqueeze``, ``permute``,
  indexing and masks, ``flip``, ``cat``, ``stack``, ``split``, …): both label sets and λ are
  carried per element, so ``F.cross_entropy(logits, y.view(-1))``,
  ``F.cross_entropy(logits.view(-1, C), y.view(-1))`` for ``[N, 1]`` labels and
  ``nn.CrossEntropyLoss()(logits, y.long())`` are the exact mixed loss. (A selection mask
  computed from ``y`` itself compares the dominant labels; the selected elements keep their full
  mix.)
- **Dense labels**: ``[N, T]`` token labels (of float feature sequences) with ``ignore_index``
  and the Hugging Face flattening ``F.cross_entropy(logits.view(-1, V), labels.view(-1))`` get
  each sample's λ on all its tokens (a token ignored on one side counts only on the other, with
  its weight); under CutMix, ``[N, H, W]`` segmentation maps take each pixel's label from the
  image the pixel came from (``λ`` = 1 outside the box, 0 inside).
- **Raises** ``MixupLossError`` **naming the op** for a cast to a float, complex or bool dtype
  (``y.float()``: put float targets in the batch instead — they are mixed directly), any loss
  other than cross-entropy (``nll_loss``, MSE, BCE, a hand-written one, …; the message names the
  supported forms), a computation combining the labels with a tensor that requires grad
  (``log_probs.gather(1, y[:, None])``, ``log_probs * F.one_hot(y, C)``), copying them into
  another tensor in place, and a loss on labels modified in place after mixing.
- **Every other op** (``y - 1``, ``F.one_hot``, ``torch.where``, ``unique``, …) computes on the
  dominant labels, so metrics keep working, and returns ``UnmixedLabels``: a tensor that behaves
  like a plain one but remembers the op that dropped the mix and raises ``MixupLossError`` naming
  it if it reaches a loss or a tensor requiring grad. Counts (``bincount``, ``count_nonzero``,
  ``histc``) are statistics, not labels, and return plain tensors, so metric states stay plain.
- **Not caught**: comparisons (``y == c``) return plain ``bool`` tensors (metrics need them), so
  a loss built from a mask of the labels (``log_probs[y[:, None] == classes]``) trains on the
  dominant labels; so does anything after leaving torch (``.tolist()``, ``.numpy()``,
  ``.item()``, Python iteration) or after asking for the plain labels (``y.dominant()``,
  ``y.as_subclass(torch.Tensor)``).

What the callback validates
---------------------------
- **In the constructor**: ``alpha`` and ``cutmix_alpha`` finite and ≥ 0 (not both 0); ``prob``,
  ``switch_prob`` in [0, 1]; ``label_smoothing`` in [0, 1); ``off_last_epochs``,
  ``off_last_steps`` whole numbers ≥ 0; ``input_index`` ≠ ``target_index`` (ints),
  ``input_key`` ≠ ``target_key``; ``seed`` an int. The message names the option and what it
  must be.
- **Any valid α is safe**: λ is drawn as ``sigmoid(log X − log Y)`` with ``X, Y ~ Gamma(α)`` in
  log space, so tiny α (1e-30, 1e-300) gives λ ∈ {0, 1} — a fair coin, the α → 0 limit of
  Beta(α, α) — never NaN, and huge α (1e6) gives λ ≈ 1/2. The rejection sampler stops after 64
  rounds (at most ~5e-84 probability of needing more) with an error, so nothing can hang.
- **At the first batch**: integer or bool inputs (token ids) with mixup on — ``λ x + (1 − λ)
  x_π`` would be truncated to one of the two samples while the loss keeps both labels; mix
  embeddings inside the model instead (CutMix alone copies pixels and accepts ``uint8``
  images); CutMix on non-images or on dense targets of another size; running mixup with dense
  labels.

Randomness, checkpoints, logging, K-FAC
---------------------------------------
Each rank draws from its own ``torch.Generator``, seeded from ``seed`` (default: Lightning's
global seed, else 0) and the global rank, so ranks draw different λ and permutations; its state
is checkpointed, so a resumed run draws the same λ sequence. No global RNG state is touched.
``mixup/lambda_mean``, ``mixup/lambda_min``, ``mixup/applied``, ``mixup/cutmix`` are logged.
With ``KFACDDPStrategy``, K-FAC's factors come from the mixed inputs (``A``) and the gradients
of the mixed loss (``G``), as in Osawa et al.'s ImageNet code: the curvature of the loss
actually minimised.
"""

import importlib
from typing import TYPE_CHECKING, Any

from lightning_kfac._requires import lightning_requirement, package_dir
from lightning_kfac.mixup.inputs import (
    cutmix_boxes,
    cutmix_inputs,
    cutmix_inputs_and_mask,
    cutmix_mask,
    mix_inputs,
)
from lightning_kfac.mixup.labels import (
    SUPPORTED_FORMS,
    MixedLabels,
    MixupLossError,
    UnmixedLabels,
    mix_soft_targets,
)
from lightning_kfac.mixup.sampling import (
    sample_beta,
    sample_gamma,
    sample_lambdas,
    sample_log_gamma,
    sample_permutation,
)

if TYPE_CHECKING:
    from lightning_kfac.mixup.callback import MixupCallback

__all__ = [
    "SUPPORTED_FORMS",
    "MixedLabels",
    "MixupCallback",
    "MixupLossError",
    "UnmixedLabels",
    "cutmix_boxes",
    "cutmix_inputs",
    "cutmix_inputs_and_mask",
    "cutmix_mask",
    "mix_inputs",
    "mix_soft_targets",
    "sample_beta",
    "sample_gamma",
    "sample_lambdas",
    "sample_log_gamma",
    "sample_permutation",
]


def __getattr__(name: str) -> Any:
    """``MixupCallback`` on first use (it needs ``pytorch_lightning``; the rest does not)."""
    if name != "MixupCallback":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with lightning_requirement(f"{__name__}.{name}"):
        value = importlib.import_module("lightning_kfac.mixup.callback").MixupCallback
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return package_dir(globals(), __all__)
