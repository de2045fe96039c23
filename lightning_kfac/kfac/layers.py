"""Layer adapters: bring each supported layer into the shared ``[blocks, N·T, features]`` layout.

K-FAC's math (``linalg``, ``factors``) never looks at layer types. An adapter only converts:

- the layer input into activation rows ``a`` of shape ``[B, N·T, d_in]`` (without the bias ``1``:
  ``linalg.covariance_sum`` appends it implicitly),
- the gradient w.r.t. the layer output into rows ``g`` of shape ``[B, N·T, d_out]``,
- ``weight.grad`` (and ``bias.grad``) into the matrix ``dW`` of shape ``[B, d_out, d_in (+1)]``,
  and a preconditioned matrix back into ``.grad``.

``B`` is the number of Kronecker blocks (groups of a grouped convolution, else 1), ``N`` the size
of dimension 0 and ``T`` the number of weight-sharing positions: output locations of a Conv2d
(KFC, Grosse & Martens 2016) or the product of the middle dimensions of a Linear applied to
``(N, ..., d)`` inputs (the "expand" setting of Eschenhagen et al. 2023).
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerAdapter(abc.ABC):
    """Converts one module's tensors to and from the shared layout."""

    #: Number of dimensions of an *unbatched* input/output (then ``N = 1``).
    unbatched_dims: int

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        bias = module.bias
        #: A bias takes part in the Kronecker block only when it is trained (fixed at registration).
        self.has_bias = isinstance(bias, Tensor) and bias.requires_grad

    @property
    def weight(self) -> Tensor:
        return self.module.weight  # type: ignore[return-value]

    def batch_size(self, tensor: Tensor) -> int:
        """``N``: the size of dimension 0 of a batched input or output, 1 if unbatched."""
        return 1 if tensor.dim() <= self.unbatched_dims else tensor.shape[0]

    @property
    @abc.abstractmethod
    def blocks(self) -> int:
        """Number of independent Kronecker blocks."""

    @property
    @abc.abstractmethod
    def in_features(self) -> int:
        """Side of one ``A`` block without the bias row (``d_in``)."""

    @property
    @abc.abstractmethod
    def out_features(self) -> int:
        """Side of one ``G`` block (``d_out``)."""

    @property
    def a_dim(self) -> int:
        return self.in_features + int(self.has_bias)

    @abc.abstractmethod
    def row_count(self, output: Tensor) -> int:
        """``N·T``: number of rows of the shared layout for this output (or output gradient)."""

    @abc.abstractmethod
    def activation_rows(self, layer_input: Tensor, index: Tensor | None = None) -> Tensor:
        """Input of the layer -> ``[B, N·T, d_in]``; only the rows ``index`` when given."""

    @abc.abstractmethod
    def output_gradient_rows(self, output_gradient: Tensor, index: Tensor | None = None) -> Tensor:
        """Gradient w.r.t. the layer output -> ``[B, N·T, d_out]``; only rows ``index`` if given."""

    @abc.abstractmethod
    def _weight_matrix(self, weight_like: Tensor) -> Tensor:
        """Weight-shaped tensor -> ``[B, d_out, d_in]``."""

    def gradient_matrix(self) -> Tensor | None:
        """``[weight.grad, bias.grad]`` as ``[B, d_out, d_in (+1)]``; None without a gradient."""
        weight_grad = self.weight.grad
        if weight_grad is None:
            return None
        matrix = self._weight_matrix(weight_grad)
        if self.has_bias:
            bias_grad = self.module.bias.grad  # type: ignore[union-attr]
            if bias_grad is None:
                bias_grad = torch.zeros(
                    self.weight.shape[0], dtype=matrix.dtype, device=matrix.device
                )
            matrix = torch.cat([matrix, bias_grad.view(self.blocks, self.out_features, 1)], dim=-1)
        return matrix

    def set_gradient_matrix(self, matrix: Tensor) -> None:
        """Write ``[B, d_out, d_in (+1)]`` back into ``weight.grad`` (and ``bias.grad``)."""
        weight_grad = self.weight.grad
        assert weight_grad is not None
        weight_grad.copy_(matrix[..., : self.in_features].reshape(weight_grad.shape))
        if self.has_bias:
            bias = self.module.bias
            assert isinstance(bias, Tensor)
            bias_values = matrix[..., self.in_features].reshape(bias.shape)
            if bias.grad is None:
                bias.grad = bias_values.to(bias.dtype).clone()
            else:
                bias.grad.copy_(bias_values)


class LinearAdapter(LayerAdapter):
    """``nn.Linear`` on inputs ``(N, ..., d_in)``: ``T`` is the product of the middle dimensions."""

    module: nn.Linear
    unbatched_dims = 1

    @property
    def blocks(self) -> int:
        return 1

    @property
    def in_features(self) -> int:
        return self.module.in_features

    @property
    def out_features(self) -> int:
        return self.module.out_features

    def row_count(self, output: Tensor) -> int:
        return output.numel() // self.out_features

    @staticmethod
    def _rows(tensor: Tensor, features: int, index: Tensor | None) -> Tensor:
        rows = tensor.reshape(-1, features)
        return (rows if index is None else rows[index]).unsqueeze(0)

    def activation_rows(self, layer_input: Tensor, index: Tensor | None = None) -> Tensor:
        return self._rows(layer_input, self.in_features, index)

    def output_gradient_rows(self, output_gradient: Tensor, index: Tensor | None = None) -> Tensor:
        return self._rows(output_gradient, self.out_features, index)

    def _weight_matrix(self, weight_like: Tensor) -> Tensor:
        return weight_like.unsqueeze(0)


class Conv2dAdapter(LayerAdapter):
    """``nn.Conv2d`` with any stride, padding (numbers, ``'same'``, ``'valid'``, any padding mode),
    dilation and groups. ``T`` is the number of output locations and ``a_{n,t}`` the input patch
    (flattened channel-major, the order of ``weight.view(out, -1)``) that produces output ``t``.
    Groups are independent Kronecker blocks.
    """

    module: nn.Conv2d
    unbatched_dims = 3

    @property
    def blocks(self) -> int:
        return self.module.groups

    @property
    def in_features(self) -> int:
        return (self.module.in_channels // self.module.groups) * math.prod(self.module.kernel_size)

    @property
    def out_features(self) -> int:
        return self.module.out_channels // self.module.groups

    def row_count(self, output: Tensor) -> int:
        batched = output if output.dim() == 4 else output.unsqueeze(0)
        return batched.shape[0] * batched.shape[2] * batched.shape[3]

    def _patch_view(self, layer_input: Tensor) -> Tensor:
        """Input ``[N, C, H, W]`` -> a zero-copy strided view ``[N, Ho, Wo, B, C/B, kh, kw]``
        of the (padded) input: element ``[n, i, j, b]`` is the patch group ``b`` of the
        convolution multiplies at output location ``(i, j)``, flattened channel-major like
        ``weight.view(out, -1)``."""
        conv = self.module
        if layer_input.dim() == 3:  # unbatched [C, H, W]
            layer_input = layer_input.unsqueeze(0)
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            # Same rule as nn.Conv2d: explicit (possibly asymmetric, possibly non-zero) padding.
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            padded = F.pad(layer_input, conv._reversed_padding_repeated_twice, mode=mode)
        else:
            ph, pw = conv.padding
            padded = F.pad(layer_input, (pw, pw, ph, ph)) if ph or pw else layer_input
        (kh, kw), (dh, dw), (sh, sw) = conv.kernel_size, conv.dilation, conv.stride
        # unfold(dim, size, step) is a view; a dilated kernel spans (k - 1)·d + 1 inputs.
        view = padded.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)
        view = view[..., ::dh, ::dw]  # [N, C, Ho, Wo, kh, kw]
        batch, channels, out_h, out_w = view.shape[:4]
        view = view.reshape(batch, self.blocks, channels // self.blocks, out_h, out_w, kh, kw)
        return view.permute(0, 3, 4, 1, 2, 5, 6)

    def activation_rows(self, layer_input: Tensor, index: Tensor | None = None) -> Tensor:
        view = self._patch_view(layer_input)  # [N, Ho, Wo, B, C/B, kh, kw]
        if index is None:
            rows = view.reshape(-1, self.blocks, self.in_features)  # the one copy
        else:  # gather only the sampled patches, straight from the input
            _, out_h, out_w = view.shape[:3]
            n, rest = index // (out_h * out_w), index % (out_h * out_w)
            rows = view[n, rest // out_w, rest % out_w].reshape(-1, self.blocks, self.in_features)
        return rows.transpose(0, 1)

    def output_gradient_rows(self, output_gradient: Tensor, index: Tensor | None = None) -> Tensor:
        if output_gradient.dim() == 3:
            output_gradient = output_gradient.unsqueeze(0)
        batch = output_gradient.shape[0]
        grads = output_gradient.reshape(batch, self.blocks, self.out_features, -1)
        grads = grads.permute(3, 0, 1, 2)  # [L, N, B, d_out]: rows ordered (n, location)
        if index is None:
            rows = grads.transpose(0, 1).reshape(-1, self.blocks, self.out_features)
        else:
            locations = grads.shape[0]
            rows = grads[index % locations, index // locations]
        return rows.transpose(0, 1)

    def _weight_matrix(self, weight_like: Tensor) -> Tensor:
        return weight_like.reshape(self.blocks, self.out_features, self.in_features)


#: Module types K-FAC preconditions, and the adapter for each.
ADAPTERS: dict[type[nn.Module], type[LayerAdapter]] = {
    nn.Linear: LinearAdapter,
    nn.Conv2d: Conv2dAdapter,
}


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter for ``module``'s exact type (subclasses with their own ``forward`` are not
    assumed to compute the same function), or None if the type is unsupported."""
    adapter_type = ADAPTERS.get(type(module))
    return None if adapter_type is None else adapter_type(module)
