"""Elementwise uses: a parameter broadcast against the batch — ``x * w``, ``x + b``, ``x - b``,
``torch.cat`` of a parameter expanded over the batch.

HF ``LlamaRMSNorm`` / ``T5LayerNorm`` (``weight * hidden``), layer scales (``gamma * x``), ViT's
``x + position_embeddings`` and ``torch.cat((cls_token.expand(N, -1, -1), x), 1)``. The curvature
is the diagonal of the per-sample Fisher: with ``u_{n,c} = ∂l_n/∂w_c`` — the output gradient (times
``x`` for a product) summed over every position sample ``n``'s output shares ``w_c`` with —
``F_c = (1/N) Σ_n u_{n,c}²`` and the step is ``(F_c + λ)⁻¹ ∂loss/∂w_c``: a unit-wise block of size
1 per element, damped like the others (docs/design.md, "Elementwise parameters").

Recognised only when one operand is a trained parameter (a leaf, or a view of one) that does not
extend along the samples' dimension; anything else (two parameters, a parameter varying per
sample, division) is declined and, if it computes with a tracked parameter, named unsupported.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_kfac.kfac.calls import ParameterView, RecognizedCall, argument
from lightning_kfac.kfac.kinds.base import Kind, SampleCall, SupportedUse, UnitWiseModel
from lightning_kfac.kfac.kinds.linear import positions_of_features

NAME = "elementwise"


def _is_parameter(value: Any) -> bool:
    """A tensor that is a parameter, or a view of one (no computation in between)."""
    if not isinstance(value, Tensor):
        return False
    leaf = value._base if value._base is not None else value
    return leaf.is_leaf and leaf.requires_grad


_VIEWS = ("ViewBackward0", "AliasBackward0", "ExpandBackward0")


def _scale_of(product: Tensor, like: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(w, x)`` when ``product`` is ``w * x`` (either order) with ``w`` a parameter shaped like
    ``like`` (read from the product's autograd node and the tensors it saved), else None."""
    node = product.grad_fn
    if node is None or node.name() != "MulBackward0":
        return None
    for position, (source, _) in enumerate(node.next_functions):
        while source is not None and source.name() in _VIEWS:
            source = source.next_functions[0][0]
        variable = getattr(source, "variable", None)
        if isinstance(variable, Tensor) and variable.shape == like.shape and variable is not like:
            try:
                other = node._saved_other if position == 0 else node._saved_self
            except RuntimeError:  # not saved (freed): not a pair this library can model
                return None
            return variable, other
    return None


def _binary(op: str, reflected: bool = False) -> Any:
    """Recogniser of ``op(a, b)`` (``reflected``: ``b op a``, the ``__r*__`` methods)."""

    def recognize(func: Any, args: list[Any], kwargs: dict[str, Any]) -> RecognizedCall | None:
        a, b = argument(args, kwargs, 0, "input", None), argument(args, kwargs, 1, "other", None)
        if reflected:
            a, b = b, a
        first, second = _is_parameter(a), _is_parameter(b)
        if first == second or not all(isinstance(t, Tensor) for t in (a, b)):
            return None  # no parameter operand (or two): not an elementwise use
        weight, x = (a, b) if first else (b, a)
        sign = -1.0 if (op == "sub" and not first) else 1.0
        slot_index = (0 if first else 1) if not reflected else (1 if first else 0)
        pair = _scale_of(x, like=weight) if op == "add" else None
        if pair is not None:  # x = w * h: a scale and shift per channel, one unit-wise use
            scale, h = pair
            return RecognizedCall(
                NAME, func, args, kwargs, h, scale, weight, None, slot_index,
                detail=("affine",), absorbs=x,
            )  # fmt: skip
        call = RecognizedCall(
            NAME, func, args, kwargs, x, weight, None, slot_index, None,
            detail=(op,), routing=sign,
        )  # fmt: skip
        if kwargs.get("alpha", 1) != 1:
            call.unsupported = f"{op} with alpha other than 1"
        return call

    return recognize


def recognize_cat(func: Any, args: list[Any], kwargs: dict[str, Any]) -> RecognizedCall | None:
    """``torch.cat(tensors, dim)`` with one tensor a parameter expanded over the batch."""
    tensors = argument(args, kwargs, 0, "tensors", None)
    dim = argument(args, kwargs, 1, "dim", 0)
    if not isinstance(tensors, list | tuple):
        return None
    found = [i for i, t in enumerate(tensors) if _is_parameter(t)]
    if len(found) != 1:
        return None
    (position,) = found
    weight = tensors[position]
    dim = dim % weight.dim()
    start = sum(int(t.shape[dim]) for t in tensors[:position])
    call = RecognizedCall(
        NAME, func, args, kwargs, weight, weight, None, None, None,
        detail=("cat", dim, start, int(weight.shape[dim])),
    )  # fmt: skip
    return call


class ElementwiseModel(UnitWiseModel):
    """Diagonal per-sample Fisher of a parameter combined elementwise with the batch."""

    @classmethod
    def problem(
        cls, call: RecognizedCall, weight: ParameterView | None, bias: ParameterView | None
    ) -> str | None:
        if weight is None:
            return f"elementwise {call.detail[0]} with a parameter K-FAC does not train"
        if bias is not None and (bias.is_part or call.detail[0] != "affine"):
            return f"elementwise {call.detail[0]} with a slice of the parameter"
        if weight.rows is not None or weight.selected or weight.transposed:
            return f"elementwise {call.detail[0]} with a slice of the parameter"
        if call.detail[0] != "cat" and weight.broadcast:
            return f"elementwise {call.detail[0]} with an expanded view of the parameter"
        return None

    @property
    def channels(self) -> int:
        shape = self.shapes[self.spec.first_part.name]
        count = 1
        for size in shape:
            count *= size
        return count

    def gradient_mask(
        self, layer_input: Tensor, batch_dim: int, positions: Tensor
    ) -> Tensor | None:
        """Over ``(N, T, C)`` outputs, padding positions add nothing to the per-sample sums."""
        if self.spec.detail[0] == "cat":
            return None
        return positions_of_features(layer_input, batch_dim, positions)

    def begin_samples(
        self,
        layer_input: Tensor,
        call: RecognizedCall,
        batch_dim: int,
        batch_size: int,
        dtype: torch.dtype,
    ) -> tuple[Tensor | None, tuple[int, ...], float]:
        op = self.spec.detail[0]
        shape = tuple(call.weight.shape) if isinstance(call.weight, Tensor) else ()
        keep = layer_input if op in ("mul", "affine") else None  # the product's other factor
        return keep, shape, float(call.routing or 1.0)

    def end_samples(
        self,
        begun: tuple[Tensor | None, tuple[int, ...], float],
        output_gradient: Tensor,
        batch_dim: int,
        batch_size: int,
    ) -> SampleCall:
        other, weight_shape, sign = begun
        op = self.spec.detail[0]
        if op == "affine":  # (scale, shift): u = (Σ g h, Σ g) per channel
            assert other is not None
            parts = [output_gradient * other.to(output_gradient.dtype), output_gradient]
            samples = [self._per_sample(p, weight_shape, batch_dim, batch_size) for p in parts]
            return SampleCall(None, 0, torch.cat(samples, dim=-1))
        if op == "cat":
            _, dim, start, length = self.spec.detail
            gradient = output_gradient.narrow(dim, start, length)
        elif op == "mul":
            assert other is not None
            gradient = output_gradient * other.to(output_gradient.dtype)
        else:
            gradient = output_gradient * sign
        return SampleCall(None, 0, self._per_sample(gradient, weight_shape, batch_dim, batch_size))

    def _per_sample(
        self, gradient: Tensor, weight_shape: tuple[int, ...], batch_dim: int, batch_size: int
    ) -> Tensor:
        """``u`` ``[N, C, 1]``: the gradient summed, per sample, over every dimension the
        parameter is broadcast along (its own dims right-aligned with the output's)."""
        if gradient.dim() <= batch_dim or gradient.shape[batch_dim] != batch_size:
            gradient, batch_dim = gradient.unsqueeze(0), 0  # no samples' dimension: one sample
        full = gradient.dim()
        aligned = [1] * (full - len(weight_shape)) + list(weight_shape)
        reduce = [d for d in range(full) if d != batch_dim and aligned[d] == 1]
        summed = gradient.sum(dim=reduce, keepdim=True) if reduce else gradient
        return summed.movedim(batch_dim, 0).reshape(summed.shape[batch_dim], self.channels, 1)


_mul = {torch.mul: _binary("mul"), torch.Tensor.mul: _binary("mul")}
_mul |= {torch.Tensor.__mul__: _binary("mul"), torch.Tensor.__rmul__: _binary("mul", True)}
_add = {torch.add: _binary("add"), torch.Tensor.add: _binary("add")}
_add |= {torch.Tensor.__add__: _binary("add"), torch.Tensor.__radd__: _binary("add", True)}
_sub = {torch.sub: _binary("sub"), torch.Tensor.sub: _binary("sub")}
_sub |= {torch.Tensor.__sub__: _binary("sub"), torch.Tensor.__rsub__: _binary("sub", True)}

KIND = Kind(
    name=NAME,
    recognizers={**_mul, **_add, **_sub, torch.cat: recognize_cat},
    model=ElementwiseModel,
    supported=(
        SupportedUse(
            "`x * w`, `x + b`, `x - b`, `torch.cat` of `w.expand(N, ...)`",
            "HF `LlamaRMSNorm`, `T5LayerNorm`, layer scales, ViT position embeddings and "
            "class token",
            "diagonal per-sample Fisher `(1/N) Σ_n (∂l_n/∂w)²`, damped like the rest",
        ),
    ),
)
