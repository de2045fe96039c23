"""Labels that mix their loss (pure torch): ``MixedLabels``, ``UnmixedLabels``, the exact mixed
cross-entropy, and ``MixupLossError``.

What these labels guarantee — which ops keep the mix, which raise, what is not caught — is the
contract in :mod:`lightning_kfac.mixup`. This module is how it is kept:

- ``MixedLabels`` is an integer tensor of the dominant labels ``where(λ ≥ 1/2, y, y_π)`` carrying
  ``y``, ``y_π`` (or a soft partner) and ``λ`` *per element*, so the components have the
  tensor's shape and can follow it.
- Its ``__torch_function__`` routes every op: ``F.cross_entropy`` to :func:`_mixed_cross_entropy`;
  value-preserving conversions re-wrap the result with converted components; an op that only
  selects or rearranges elements is applied to an index tensor as well, which says where each
  output element came from, and both label sets and ``λ`` are gathered with it; every other op
  computes on the dominant labels and returns ``UnmixedLabels`` remembering the op (counts and
  comparisons return plain tensors).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

SUPPORTED_FORMS = (
    "F.cross_entropy(logits, y) or nn.CrossEntropyLoss(...)(logits, y) on integer class labels "
    "(weight, ignore_index, label_smoothing and every reduction are supported; y may first go "
    "through .view / .reshape / .flatten / .squeeze / .long / .to(device) / indexing, which keep "
    "the mix), or float (soft / one-hot) targets in the batch, which are mixed directly"
)


class MixupLossError(RuntimeError):
    """Mixed labels reached a computation that cannot keep their mix (the contract in
    :mod:`lightning_kfac.mixup` lists them).

    A ``RuntimeError``, not a ``TypeError``: torch turns a ``TypeError`` raised inside a binary
    operator (``log_probs * F.one_hot(y)``) into ``NotImplemented`` and loses the message.
    """


# -- targets ----------------------------------------------------------------------------------
def mix_soft_targets(
    targets: Tensor, partner: Tensor, lam: Tensor, label_smoothing: float = 0.0
) -> Tensor:
    """``λ t + (1 − λ) t'`` for float targets ``[N, C, ...]``, then ``(1 − ε) t + ε / C``.

    ``lam`` is per sample (``[N]``) or per location (``[N, ...]``, the targets' shape without the
    class dimension ``C``, e.g. CutMix's pixel mask for dense targets).
    """
    per_sample = lam.dim() == 1
    lam = lam.view(-1, *([1] * (targets.dim() - 1))) if per_sample else lam.unsqueeze(1)
    weights = lam.to(device=targets.device, dtype=targets.dtype)
    mixed = weights * targets + (1 - weights) * partner
    if label_smoothing:
        mixed = (1 - label_smoothing) * mixed + label_smoothing / targets.shape[1]
    return mixed


@dataclass(frozen=True, eq=False)
class _BatchMix:
    """The per-sample mix of one batch as drawn, for running mixup's record of soft targets."""

    labels_a: Tensor  # [N]
    labels_b: Tensor | None  # [N]
    soft_partner: Tensor | None  # [N, C]
    lam: Tensor  # [N]
    on_soft_targets: Callable[[Tensor], None]

    def report(self, classes: int, dtype: torch.dtype) -> None:
        """Hand the batch's unsmoothed soft targets ``[N, C]`` to ``on_soft_targets``."""
        own = F.one_hot(self.labels_a.clamp_min(0), classes).to(dtype)
        if self.soft_partner is not None:
            partner = self.soft_partner.to(own)
        else:
            assert self.labels_b is not None
            partner = F.one_hot(self.labels_b.clamp_min(0), classes).to(dtype)
        self.on_soft_targets(mix_soft_targets(own, partner, self.lam).detach())


class MixedLabels(Tensor):
    """Integer labels carrying their mixup partner (contract: :mod:`lightning_kfac.mixup`).

    The tensor's own values are the dominant labels ``where(λ ≥ 1/2, y, y_π)``. The attributes
    have the tensor's shape (element-wise), so they follow every op that keeps the mix.

    Attributes:
        labels_a: The batch's own labels ``y``.
        labels_b: The partner labels ``y_π`` (None when the partner is ``soft_partner``).
        soft_partner: Float partner targets, the tensor's shape plus a class dimension (running
            mixup), else None.
        lam: ``λ`` per element (float64).
        label_smoothing: Used when the loss call does not set its own.
    """

    labels_a: Tensor
    labels_b: Tensor | None
    soft_partner: Tensor | None
    lam: Tensor
    label_smoothing: float
    _batches: tuple[_BatchMix, ...]
    _clean_version: int
    _modified_by: str | None

    @staticmethod
    def __new__(
        cls,
        labels_a: Tensor,
        lam: Tensor,
        *,
        labels_b: Tensor | None = None,
        soft_partner: Tensor | None = None,
        label_smoothing: float = 0.0,
        on_soft_targets: Callable[[Tensor], None] | None = None,
    ) -> MixedLabels:
        """Mix ``labels_a`` (``[N, ...]``) with ``labels_b`` (same shape) or ``soft_partner``.

        Args:
            labels_a: Integer labels ``y``, shape ``[N, ...]``.
            lam: ``λ`` per sample (``[N]``, broadcast over the trailing label dimensions) or per
                element (``labels_a``'s shape).
            labels_b: Partner labels ``y_π``.
            soft_partner: Float partner targets ``[N, C]`` (per-sample labels only) or
                ``labels_a.shape + (C,)``.
            label_smoothing: ε used when the loss call sets none.
            on_soft_targets: Called with the batch's (unsmoothed) per-sample soft targets
                ``[N, C]`` whenever the loss is computed, so running mixup can mix the next batch
                with them. Needs per-sample labels (one label per sample).
        """
        if (labels_b is None) == (soft_partner is None):
            raise ValueError("give exactly one of labels_b and soft_partner")
        with torch._C.DisableTorchFunctionSubclass():
            labels_a = _plain(labels_a)
            count = labels_a.shape[0] if labels_a.dim() else 1
            lam = _plain(lam).to(labels_a.device)
            if lam.shape != labels_a.shape:
                if lam.shape != (count,):
                    raise ValueError(
                        f"lam must have shape [N] = [{count}] or the labels' shape "
                        f"{tuple(labels_a.shape)}, got {tuple(lam.shape)}"
                    )
                lam = lam.view(-1, *([1] * (labels_a.dim() - 1))).expand(labels_a.shape)
            per_sample = labels_a.numel() == count
            if labels_b is not None:
                labels_b = _plain(labels_b).to(labels_a.device)
                if labels_b.shape != labels_a.shape:
                    raise ValueError(
                        f"labels_b has shape {tuple(labels_b.shape)}, labels_a "
                        f"{tuple(labels_a.shape)}"
                    )
                partner_labels = labels_b
            else:
                assert soft_partner is not None
                soft_partner = _plain(soft_partner).to(labels_a.device)
                if soft_partner.shape[:-1] != labels_a.shape:
                    if not (per_sample and soft_partner.dim() == 2):
                        raise ValueError(
                            f"soft_partner must have shape [N, C] or labels.shape + (C,), got "
                            f"{tuple(soft_partner.shape)} for labels {tuple(labels_a.shape)}"
                        )
                    soft_partner = soft_partner.reshape(*labels_a.shape, soft_partner.shape[-1])
                partner_labels = soft_partner.argmax(-1)
            batches: tuple[_BatchMix, ...] = ()
            if on_soft_targets is not None:
                if not per_sample:
                    raise ValueError(
                        "on_soft_targets (running mixup) needs one label per sample, got labels "
                        f"of shape {tuple(labels_a.shape)}"
                    )
                batches = (
                    _BatchMix(
                        labels_a.reshape(count),
                        None if labels_b is None else labels_b.reshape(count),
                        None
                        if soft_partner is None
                        else soft_partner.reshape(count, soft_partner.shape[-1]),
                        lam.reshape(count),
                        on_soft_targets,
                    ),
                )
            dominant = torch.where(lam >= 0.5, labels_a, partner_labels)
            return cls._assemble(
                dominant,
                labels_a=labels_a,
                labels_b=labels_b,
                soft_partner=soft_partner,
                lam=lam,
                label_smoothing=label_smoothing,
                batches=batches,
            )

    @classmethod
    def _assemble(
        cls,
        dominant: Tensor,
        *,
        labels_a: Tensor,
        labels_b: Tensor | None,
        soft_partner: Tensor | None,
        lam: Tensor,
        label_smoothing: float,
        batches: tuple[_BatchMix, ...],
    ) -> MixedLabels:
        """Wrap ``dominant`` (aliased, not copied) with element-wise components of its shape."""
        with torch._C.DisableTorchFunctionSubclass():
            instance = Tensor._make_subclass(cls, dominant.detach())
            instance.labels_a = labels_a
            instance.labels_b = labels_b
            instance.soft_partner = soft_partner
            instance.lam = lam
            instance.label_smoothing = label_smoothing
            instance._batches = batches
            instance._clean_version = instance._version
            instance._modified_by = None
        return instance

    def dominant(self) -> Tensor:
        """The dominant labels as a plain tensor (an alias): an explicit, unchecked opt-out."""
        with torch._C.DisableTorchFunctionSubclass():
            return self.as_subclass(Tensor)

    @classmethod
    def __torch_function__(
        cls, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        return _dispatch(func, args, kwargs or {})


class UnmixedLabels(Tensor):
    """Values computed from ``MixedLabels`` by an op the mix cannot follow.

    Behaves like the plain tensor it holds (the op applied to the dominant labels), except that
    using it in a loss, or with a tensor that requires grad, raises ``MixupLossError`` naming
    ``origin``. Ops on it keep it ``UnmixedLabels``; comparisons give plain ``bool`` tensors.

    Attributes:
        origin: The op that dropped the mix, e.g. ``"F.one_hot"``.
    """

    origin: str

    @classmethod
    def __torch_function__(
        cls, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        return _dispatch(func, args, kwargs or {})


# -- dispatch ---------------------------------------------------------------------------------
_LOSSES = {
    F.nll_loss,
    F.mse_loss,
    F.l1_loss,
    F.smooth_l1_loss,
    F.huber_loss,
    F.binary_cross_entropy,
    F.binary_cross_entropy_with_logits,
    F.kl_div,
    F.poisson_nll_loss,
    F.gaussian_nll_loss,
    F.multi_margin_loss,
    F.multilabel_margin_loss,
    F.multilabel_soft_margin_loss,
    F.soft_margin_loss,
    F.hinge_embedding_loss,
    F.margin_ranking_loss,
    F.cosine_embedding_loss,
    F.ctc_loss,
}


def _functions(owner: Any, names: str) -> set[Any]:
    return {getattr(owner, name) for name in names.split() if hasattr(owner, name)}


# Value-preserving conversions: applied to the labels, the components follow device and dtype.
_CONVERSIONS = _functions(
    Tensor,
    "to cpu cuda xpu long int short char byte type clone detach contiguous pin_memory "
    "float double half bfloat16 bool cfloat cdouble __deepcopy__",
) | _functions(torch, "clone detach")
_GETTERS = {Tensor.data.__get__}
# Ops that only select or rearrange elements: their result applied to an index tensor says where
# each output element came from. Tensor-valued arguments other than the first are indices/masks.
_STRUCTURAL_NAMES = (
    "view view_as reshape reshape_as flatten unflatten ravel squeeze unsqueeze permute transpose "
    "swapaxes swapdims t movedim moveaxis expand expand_as broadcast_to narrow select split "
    "split_with_sizes chunk unbind tensor_split __getitem__ flip fliplr flipud roll repeat tile "
    "repeat_interleave index_select gather take take_along_dim masked_select diagonal unfold "
    "atleast_1d atleast_2d atleast_3d"
)
_STRUCTURAL = _functions(Tensor, _STRUCTURAL_NAMES) | _functions(torch, _STRUCTURAL_NAMES)
_STRUCTURAL_GETTERS = {Tensor.T.__get__, Tensor.mT.__get__, Tensor.H.__get__, Tensor.mH.__get__}
# Structural ops over a sequence of tensors.
_JOINS = _functions(torch, "cat concat concatenate stack hstack vstack dstack row_stack")
# Counting labels gives statistics, not targets: their results are plain tensors, so metric
# states (confusion matrices from ``bincount``) stay plain. Sums are not on this list: a sum of
# one-hot rows is a multi-hot target.
_STATISTICS = _functions(Tensor, "bincount count_nonzero histc") | (
    _functions(torch, "bincount count_nonzero histc histogram")
)
_INPLACE_DUNDERS = {
    "__setitem__",
    "__iadd__",
    "__isub__",
    "__imul__",
    "__itruediv__",
    "__ifloordiv__",
    "__imod__",
    "__ipow__",
    "__iand__",
    "__ior__",
    "__ixor__",
    "__ilshift__",
    "__irshift__",
}


def _op_name(func: Callable[..., Any]) -> str:
    """A readable name: ``Tensor.view``, ``torch.cat``, ``F.one_hot``, ``Tensor.T``."""
    name = getattr(func, "__name__", repr(func))
    if isinstance(func, types.MethodWrapperType) and name == "__get__":
        return f"Tensor.{getattr(func.__self__, '__name__', '?')}"
    for prefix, owner in (("Tensor", Tensor), ("F", F), ("torch", torch)):
        if getattr(owner, name, None) is func:
            return f"{prefix}.{name}"
    return getattr(func, "__qualname__", name)


def _walk(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _walk(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _walk(item)


def _is_label(value: Any) -> bool:
    return isinstance(value, (MixedLabels, UnmixedLabels))


def _plain(value: Any, aliases: dict[int, Tensor] | None = None) -> Any:
    """Replace label tensors by plain aliases of their values (recursively); call with torch
    functions disabled. ``aliases`` maps each alias's id to the label tensor it stands for."""
    if _is_label(value):
        alias = value.as_subclass(Tensor)
        if aliases is not None:
            aliases[id(alias)] = value
        return alias
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_plain(v, aliases) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v, aliases) for k, v in value.items()}
    return value


def _describe(labels: list[Tensor]) -> str:
    unmixed = [t for t in labels if isinstance(t, UnmixedLabels)]
    if unmixed:
        return (
            f"labels that lost their mix in {unmixed[0].origin} (computed from the dominant "
            "labels only)"
        )
    return "mixed labels"


def _dispatch(func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    if func is F.cross_entropy:
        return _mixed_cross_entropy(*args, **kwargs)
    with torch._C.DisableTorchFunctionSubclass():
        if func in _LOSSES:
            labels = [t for t in _walk((args, kwargs)) if _is_label(t)]
            raise MixupLossError(
                f"MixupCallback cannot make {func.__name__} exact for {_describe(labels)}. "
                f"Supported: {SUPPORTED_FORMS}."
            )
        if func is Tensor.as_subclass:  # explicit opt-out
            return func(*_plain(args), **_plain(kwargs))
        if func in _CONVERSIONS or func in _GETTERS:
            out = _convert(func, args, kwargs)
            if out is not NotImplemented:
                return out
        if func in _STRUCTURAL or func in _STRUCTURAL_GETTERS or func in _JOINS:
            out = _rearrange(func, args, kwargs)
            if out is not NotImplemented:
                return out
        return _generic(func, args, kwargs)


def _convert(func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """``.long()``, ``.to(...)``, ``.clone()``, ...: same values, so the mix follows."""
    source = args[0] if args else None
    if type(source) is not MixedLabels or any(_is_label(t) for t in _walk((args[1:], kwargs))):
        return NotImplemented
    out = func(*_plain(args), **_plain(kwargs))
    if not isinstance(out, Tensor):
        return out  # e.g. y.type() -> "torch.LongTensor"
    if out.dtype == torch.bool or out.is_floating_point() or out.is_complex():
        raise MixupLossError(
            f"{_op_name(func)} would turn mixed labels into {out.dtype} numbers: the mix cannot "
            "follow a cast out of the integers, and a loss on the result would train on the "
            "dominant labels only. Keep integer labels for F.cross_entropy; for numeric (e.g. "
            "binary) targets put float targets in the batch (MixupCallback mixes those "
            "directly); for logging use y.dominant()."
        )
    device = out.device
    return MixedLabels._assemble(
        out,
        labels_a=source.labels_a.to(device=device, dtype=out.dtype),
        labels_b=None
        if source.labels_b is None
        else source.labels_b.to(device=device, dtype=out.dtype),
        soft_partner=None if source.soft_partner is None else source.soft_partner.to(device),
        lam=source.lam.to(device),
        label_smoothing=source.label_smoothing,
        batches=source._batches,
    )


def _rearrange(func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """Apply a selecting / rearranging op to the labels and to an index tensor, then gather both
    label sets and ``λ`` with the resulting indices. ``NotImplemented`` where that is not sound."""
    if not args or "out" in kwargs:
        return NotImplemented
    joined = func in _JOINS
    data = args[0]
    if joined:
        if not isinstance(data, (list, tuple)) or not data:
            return NotImplemented
        sources = list(data)
    else:
        sources = [data]
    if not all(type(s) is MixedLabels for s in sources):
        return NotImplemented
    if any(_is_label(t) for t in _walk((args[1:], kwargs))):
        return NotImplemented  # labels used as indices: value-dependent
    name = getattr(func, "__name__", "")
    if name == "view" and any(isinstance(a, torch.dtype) for a in (*args[1:], *kwargs.values())):
        return NotImplemented  # reinterpreting the bits
    if name == "repeat_interleave" and len(args) < 2 and "repeats" not in kwargs:
        return NotImplemented  # repeat_interleave(y) treats y as the repeat counts
    partnered = {s.soft_partner is None for s in sources}
    if len(partnered) != 1 or len({(s.dtype, s.device) for s in sources}) != 1:
        return NotImplemented
    indices, offset = [], 0
    for source in sources:
        count = source.numel()
        indices.append(
            torch.arange(offset, offset + count, device=source.device).view(source.shape)
        )
        offset += count
    index_data: Any = type(data)(indices) if joined else indices[0]
    out = func(*_plain(args), **_plain(kwargs))
    where = func(index_data, *args[1:], **kwargs)
    if not _same_structure(out, where, sources[0].dtype):
        return NotImplemented

    def flat(attribute: str, trailing: tuple[int, ...] = ()) -> Tensor:
        return torch.cat([getattr(s, attribute).reshape(-1, *trailing) for s in sources])

    labels_a, lam = flat("labels_a"), flat("lam")
    labels_b = flat("labels_b") if sources[0].labels_b is not None else None
    soft = None
    if sources[0].soft_partner is not None:
        soft = flat("soft_partner", (sources[0].soft_partner.shape[-1],))
    batches = tuple(dict.fromkeys(b for s in sources for b in s._batches))

    def build(dominant: Tensor, index: Tensor) -> MixedLabels:
        return MixedLabels._assemble(
            dominant,
            labels_a=labels_a[index],
            labels_b=None if labels_b is None else labels_b[index],
            soft_partner=None if soft is None else soft[index],
            lam=lam[index],
            label_smoothing=sources[0].label_smoothing,
            batches=batches,
        )

    return _map_pairs(out, where, build)


def _same_structure(out: Any, where: Any, dtype: torch.dtype) -> bool:
    if isinstance(out, Tensor):
        return isinstance(where, Tensor) and out.shape == where.shape and out.dtype == dtype
    if isinstance(out, (list, tuple)):
        return (
            isinstance(where, (list, tuple))
            and len(out) == len(where)
            and all(_same_structure(o, w, dtype) for o, w in zip(out, where, strict=True))
        )
    return False


def _map_pairs(out: Any, where: Any, build: Callable[[Tensor, Tensor], Tensor]) -> Any:
    if isinstance(out, Tensor):
        return build(out, where)
    return type(out)(_map_pairs(o, w, build) for o, w in zip(out, where, strict=True))


def _inplace_destinations(func: Callable[..., Any], args: tuple, kwargs: dict) -> list[Any]:
    name = getattr(func, "__name__", "")
    found = []
    if args and (name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("__"))):
        found.append(args[0])
    if "out" in kwargs:
        found.extend(_walk(kwargs["out"]))
    return found


# In-place writes of values into a tensor, and the positions of the written values.
_WRITES = {
    "__setitem__": 2,
    "copy_": 1,
    "index_put_": 2,
    "index_put": 2,
    "masked_scatter_": 2,
    "scatter_": 3,
    "scatter_add_": 3,
    "scatter_reduce_": 3,
    "index_copy_": 3,
}


def _copied_values(func: Callable[..., Any], args: tuple, kwargs: dict) -> list[Any]:
    """The values an op writes into its destination (not indices: ``counts[y] += 1`` is fine)."""
    if "out" in kwargs:
        return [args, {k: v for k, v in kwargs.items() if k != "out"}]
    position = _WRITES.get(getattr(func, "__name__", ""))
    if position is None:
        return []
    return [*args[position : position + 1], kwargs.get("src"), kwargs.get("source")]


def _generic(func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """Any other op: compute on the dominant labels; mark non-bool results ``UnmixedLabels``."""
    labels = [t for t in _walk((args, kwargs)) if _is_label(t)]
    op = _op_name(func)
    destinations = _inplace_destinations(func, args, kwargs)
    copied = _copied_values(func, args, kwargs)
    plain_destination = any(isinstance(d, Tensor) and not _is_label(d) for d in destinations)
    if plain_destination and any(type(t) is MixedLabels for t in _walk(copied)):
        raise MixupLossError(
            f"{op} copies mixed labels into another tensor in place, which drops the mix. "
            "Use the labels themselves or y.clone() (which keep the mix)."
        )
    if torch.is_grad_enabled() and any(t.requires_grad for t in _walk((args, kwargs))):
        raise MixupLossError(
            f"{op} combines {_describe(labels)} with a tensor that requires grad: a loss built "
            "this way would silently train on the dominant labels only. Supported: "
            f"{SUPPORTED_FORMS}. If this is not a loss (e.g. logging), detach the other tensor "
            "or use torch.no_grad()."
        )
    for destination in destinations:
        if type(destination) is MixedLabels:
            destination._modified_by = op
    aliases: dict[int, Tensor] = {}
    out = func(*_plain(args, aliases), **_plain(kwargs, aliases))
    unmixed = [t for t in labels if isinstance(t, UnmixedLabels)]
    origin = unmixed[0].origin if unmixed else op
    if func in _STATISTICS:
        return out
    inputs = {id(t) for t in _walk((args, kwargs))}
    return _taint(out, origin, aliases, inputs)


def _taint(out: Any, origin: str, aliases: dict[int, Tensor], inputs: set[int]) -> Any:
    if isinstance(out, Tensor):
        if id(out) in aliases:  # an in-place op on a label tensor returns that tensor
            return aliases[id(out)]
        if id(out) in inputs or out.dtype == torch.bool:
            return out
        tainted = out.as_subclass(UnmixedLabels)
        tainted.origin = origin
        return tainted
    if isinstance(out, (list, tuple)):
        items = [_taint(o, origin, aliases, inputs) for o in out]
        if hasattr(type(out), "n_fields"):  # torch.return_types structseq
            return type(out)(items)
        if hasattr(out, "_fields"):  # namedtuple
            return type(out)(*items)
        return type(out)(items)
    return out


# -- the loss ---------------------------------------------------------------------------------
def _mixed_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Exact mixed cross-entropy.

    With per-element terms ``ℓ_e(y) = w_y CE_e(y)`` (PyTorch's ``reduction="none"``, zero for
    ``ignore_index``), the loss is ``Σ_e [λ_e ℓ_e(y_e) + (1 − λ_e) ℓ_e(y_π,e)] / D`` with
    ``D = Σ_e [λ_e w(y_e) + (1 − λ_e) w(y_π,e)]`` for ``"mean"`` (``w = 1`` without weights, ``0``
    for ignored targets) and ``D = 1`` for ``"sum"``; elements are samples, or tokens / pixels of
    dense labels, with ``λ_e`` the ``λ_i`` of their sample. Since ``y_π`` is a permutation of
    ``y``, ``Σ_e w(y_π,e) = Σ_e w(y_e)``, so for a per-batch λ this is exactly
    ``λ CE(f, y) + (1 − λ) CE(f, y_π)`` with the same arguments; without weights or ignored
    targets it is ``mean_e[λ_e CE_e(y_e) + (1 − λ_e) CE_e(y_π,e)]``. A target ignored on one side
    only contributes its other side, with weight ``1 − λ_e`` (or ``λ_e``).
    """
    with torch._C.DisableTorchFunctionSubclass():
        others = [t for t in _walk((input, weight)) if _is_label(t)]
        if type(target) is not MixedLabels or others:
            labels = [t for t in _walk((input, target, weight)) if _is_label(t)]
            raise MixupLossError(
                f"cross_entropy cannot be made exact for {_describe(labels)}: pass the "
                f"MixedLabels themselves as the target. Supported: {SUPPORTED_FORMS}."
            )
        if target._version != target._clean_version:
            by = f" (by {target._modified_by})" if target._modified_by else ""
            raise MixupLossError(
                f"mixed labels were modified in place after mixing{by}: their partner labels "
                "and λ no longer match, so the loss would be silently wrong. Edit labels before "
                "they are mixed (in the dataset or collate_fn), or on a copy that is not used as "
                "a loss target."
            )
        if size_average is not None or reduce is not None:
            raise MixupLossError("the deprecated size_average / reduce arguments are not supported")
        smoothing = label_smoothing or target.label_smoothing
        logits = input
        classes = logits.shape[1] if logits.dim() > 1 else logits.shape[0]
        for batch in target._batches:
            batch.report(classes, logits.dtype)
        labels_a = target.labels_a.to(logits.device)
        lam = target.lam.to(device=logits.device, dtype=logits.dtype)
        if target.soft_partner is not None:  # running mixup: the partner is a soft distribution
            if bool((labels_a == ignore_index).any()):
                raise MixupLossError("running mixup does not support ignore_index targets")
            own = F.one_hot(labels_a, classes).to(logits.dtype)
            partner = target.soft_partner.to(logits)
            weights = lam.unsqueeze(-1)
            soft = weights * own + (1 - weights) * partner  # labels' shape + (C,)
            if soft.dim() > 1:
                soft = soft.movedim(-1, 1)
            return F.cross_entropy(
                logits, soft, weight=weight, reduction=reduction, label_smoothing=smoothing
            )
        assert target.labels_b is not None
        labels_b = target.labels_b.to(logits.device)
        options = dict(weight=weight, ignore_index=ignore_index, label_smoothing=smoothing)
        loss_a = F.cross_entropy(logits, labels_a, reduction="none", **options)
        loss_b = F.cross_entropy(logits, labels_b, reduction="none", **options)
        total = lam * loss_a + (1 - lam) * loss_b
        if reduction == "none":
            return total
        if reduction == "sum":
            return total.sum()
        if reduction != "mean":
            raise ValueError(f"unknown reduction {reduction!r}")

        def class_weight(labels: Tensor) -> Tensor:
            valid = labels != ignore_index
            if weight is None:
                return valid.to(logits.dtype)
            return torch.where(valid, weight.to(logits.dtype)[labels.clamp_min(0)], 0.0)

        denominator = (lam * class_weight(labels_a) + (1 - lam) * class_weight(labels_b)).sum()
        return total.sum() / denominator
