"""Input patches of a convolution and KFC's input factor ``A``, exactly and fast.

For a convolution ``F.conv{1,2,3}d`` the input factor of KFC (Grosse & Martens 2016, "A
Kronecker-factored approximate Fisher matrix for convolution layers") sums over samples ``n`` and
output locations ``t`` the outer products of the input patches::

    A = Σ_{n,t} a_{n,t} a_{n,t}^T,     a_{n,t}[c, o] = x̃[n, c, t·s + o·d]

where ``x̃`` is the zero-padded input, ``s`` the stride, ``d`` the dilation, ``o`` a kernel offset
(a tuple, one entry per spatial dimension) and the index ``(c, o_1, ..., o_D)`` is flattened
channel-major, the order of ``weight.view(out_channels, -1)`` within a group. A grouped
convolution has one independent block per group (block-diagonal ``A``). With a bias the rows are
``[a_{n,t}; 1]``: the extra row/column of the result is ``Σ_{n,t} a_{n,t}`` and its corner ``N·T``,
as :func:`lightning_kfac.kfac.linalg.covariance_sum` builds it.

Two constructions of the same matrix (:class:`CovarianceMethod`):

``gemm``
    Copy the ``N·T`` patches into a ``[N·T, d_in]`` matrix (``d_in = C/groups · Π k``) and form
    ``rows^T rows``: ``2 · N·T · d_in²`` FLOPs per group, plus the copy.

``correlation``
    For stride 1, the block pairing offsets ``o`` and ``o'`` is a sum over the output box
    ``t ∈ [0, O)`` of ``x̃[t + o·d] x̃[t + o'·d]^T``: it depends on the offsets only through
    ``Δ = (o - o')·d`` *and* the box. Write the box's indicator as a product over dimensions of
    ``1 - 1[t_i < 0] - 1[t_i ≥ O_i]`` and expand (inclusion-exclusion, ``3^D`` terms; sums
    over ``t`` outside the box vanish where a tap leaves the zero-extended image):

    - the term with no border factor is the full channel cross-correlation of the padded input,
      ``S_Δ[c, c'] = Σ_{n,u} x̃[n, c, u + Δ] x̃[n, c', u]``, for all needed shifts by *one*
      convolution of ``x̃ᵀ = [C, N, *P]`` (channels as batch, samples as input channels) with
      itself as the filter bank, ``F.conv2d(x̃ᵀ, x̃ᵀ, padding=m, stride=d)``, ``m = (k-1)·d``.
      ``S_{-Δ} = S_Δ^T``, so the first dimension is padded on its trailing side only and only
      its ``k`` shifts ``Δ ≥ 0`` are computed: ``2 · C² · N · Π P_i · k_1 Π_{i>1}(2k_i - 1)``
      FLOPs;
    - a term with border factors on the dimensions ``E`` (sign ``(-1)^|E|``) sums over the
      virtual locations ``t_i < 0`` or ``t_i ≥ O_i`` (``i ∈ E``) only, whose taps lie in the
      first or last ``m_i`` slices of ``x̃`` along ``i``. All its offset pairs come from one thin
      correlation of those border slabs, in bulk: slab positions ``r`` folded into the channels,
      the two sides as independent blocks, one batched matrix product of copied shifted windows
      (one grouped convolution when two or more dimensions remain). Offset pair ``(o, o')``
      takes the slab pairs with ``r - o·d = r' - o'·d`` (a diagonal), ``< 0`` on the leading
      side, ``≥ 0`` on the trailing side.

    The correlations of all terms are stacked as rows of ``Q [columns, C·C']`` and one product
    with a cached signed 0/1 matrix ``M [(Π k)², columns]`` assembles every offset pair: no loop
    over offset pairs. Each term enters for the pairs ``o_1 ≥ o'_1`` of its first shifted
    dimension only (weight ½ on the diagonal) and ``A = D + D^T``: exactly symmetric. The result
    is exact up to round-off (the border terms are subtracted, not approximated; float64 agrees
    with the GEMM to ~1e-15 relative, float32 to ~1e-6, as the GEMM itself). A stride ``s`` that
    divides the dilation (or meets a kernel size 1) keeps every tap on the sub-lattice ``s·Z``:
    the convolution is then a stride-1 convolution of ``x̃[::s]`` with dilation ``d / s`` and
    the construction applies unchanged (e.g. a 1×1 stride-2 shortcut). Other strided
    convolutions are rejected: their taps fall on several sub-lattices and the count of products
    no longer drops below the GEMM's (field notes). On CUDA, cuDNN's TF32 is switched off while
    the correlations run, so that float32 means float32 in both methods.

``auto`` (:func:`choose_method`)
    ``gemm`` unless the correlation is supported, the kernel has more than one tap, there are at
    most two spatial dimensions and one group (3d and grouped convolutions were not measured),
    and, with ``ratio`` = FLOP model of ``correlation`` / that of ``gemm``
    (:func:`patch_covariance_flops`):

    - 1 intra-op thread: ``ratio < 0.5`` and at least 0.01 GFLOP of GEMM work;
    - 2 or more threads: ``ratio < 0.5`` and at least 0.1 GFLOP of GEMM work (:data:`AUTO_RULE`).

    Measured by ``benchmarks/conv_covariance.py`` (``conv_covariance.json``) on the project's
    2-core CPU with nothing else running (load average 0.8-1.2): float32, 3x3 stride-1 padding-1
    unless named, GEMM time / correlation time, medians of 7 round-robin rounds:

    =============================== ===== ======= ======= ======= =======
    layer (batch 128 unless named)  FLOPs    GEMM   1 thr    GEMM   2 thr
                                    ratio   1 thr speedup   2 thr speedup
    =============================== ===== ======= ======= ======= =======
    cnn.conv1 3@32x32                0.23  16.6ms    2.26  18.2ms    2.68
    cnn.conv2 32@16x16               0.28  88.0ms    2.91  52.2ms    2.66
    cnn.conv3 64@8x8                 0.41  62.3ms    1.74  36.9ms    1.76
    notes 32@32x32                   0.23   443ms    2.94   262ms    3.05
    notes 64@16x16                   0.28   362ms    2.90   169ms    2.87
    notes 128@8x8                    0.41   338ms    1.99   134ms    2.00
    rn.stem 3@32x32                  0.23  26.3ms    1.99  14.5ms    2.39
    rn.stage1 16@32x32 (x2)          0.23   237ms    4.24   114ms    4.25
    rn.stage2.conv2 32@16x16         0.28   136ms    2.87  60.4ms    3.20
    rn.stage2.shortcut 1x1 s2        1.00   1.8ms    0.46   0.7ms    0.48
    rn.stage3.conv2 64@8x8           0.41   101ms    2.03  31.8ms    1.80
    bound 64@4x4                     0.75  26.2ms    0.97   7.9ms    0.91
    bound 128@4x4                    0.75  81.7ms    0.97  25.9ms    0.83
    bound 64@7x7                     0.45  75.9ms    1.76  30.5ms    1.58
    bound 5x5 32@16x16               0.20   499ms    4.99   237ms    4.48
    bound 7x7 stem 3@32x32           0.12   143ms    1.31  59.3ms    1.58
    bound 32@16x16 batch 8           0.34   6.9ms    1.77   2.4ms    1.37
    bound 32@16x16 batch 2           0.53   1.9ms    0.76   0.7ms    0.59
    bound 3@32x32 batch 8            0.25   1.7ms    1.01   0.7ms    0.73
    bound 16@32x32 batch 4           0.26   5.3ms    2.29   1.8ms    1.48
    =============================== ===== ======= ======= ======= =======

    The correlation wins every layer with ``ratio < 0.5`` and enough work, by 1.3-5x with one or
    two threads, and loses or ties at ``ratio ≥ 0.53`` (small images, where the border terms
    dominate) and on tiny problems: it has ~1 ms of fixed cost (about 40 sizeable operations
    against the GEMM's 8), which two threads halve less well — hence the floors (``3@32x32 batch
    8``, 13 MFLOP of GEMM work: 1.01x with one thread, 0.73x with two). An earlier measurement on
    the same machine under heavy load (load average 7-11, other jobs on both cores) had two
    threads losing for most layers: every parallel operation waited for a descheduled thread,
    which costs the correlation's many operations more than the GEMM's few. Strided layers
    (``s2``) are GEMM only. float32 error (max |error| / max |A| against a float64 reference):
    correlation ≤ 2.3e-6, GEMM ≤ 4e-7.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_kfac.kfac.linalg import covariance_sum, with_ones_row
from lightning_kfac.kfac.options import StrEnum

__all__ = [
    "AUTO_RULE",
    "ConvGeometry",
    "CovarianceMethod",
    "choose_method",
    "patch_covariance_flops",
    "patch_covariance_sum",
    "patch_rows",
    "patch_sums_per_sample",
    "patch_view",
]


class CovarianceMethod(StrEnum):
    """How :func:`patch_covariance_sum` forms ``Σ_{n,t} a_{n,t} a_{n,t}^T`` (see module doc)."""

    AUTO = "auto"
    GEMM = "gemm"
    CORRELATION = "correlation"


#: ``auto``'s thresholds per intra-op thread count (1, or 2 and more): ``correlation`` needs a
#: FLOP-model ratio (correlation / GEMM) below the first and GEMM FLOPs of at least the second.
AUTO_RULE: dict[int, tuple[float, float]] = {1: (0.5, 1e7), 2: (0.5, 1e8)}

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _tuple(value: int | Sequence[int], dims: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * dims
    values = tuple(int(v) for v in value)
    if len(values) == 1:
        return values * dims
    if len(values) != dims:
        raise ValueError(f"{name} {value!r} does not match {dims} spatial dimension(s)")
    return values


@dataclass(frozen=True)
class ConvGeometry:
    """What a convolution does to its input, independent of the input's spatial size.

    ``padding`` holds ``(before, after)`` zero padding per spatial dimension (asymmetric for
    ``padding='same'`` with an even effective kernel). Build it with :meth:`from_call`.
    """

    in_channels: int
    groups: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]

    @classmethod
    def from_call(
        cls,
        input_shape: Sequence[int],
        weight_shape: Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: str | int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
    ) -> ConvGeometry:
        """The geometry of ``F.conv{D}d(input, weight, bias, stride, padding, dilation, groups)``.

        ``weight_shape`` is ``[out_channels, in_channels / groups, *kernel]`` (``D = 1, 2, 3``);
        ``input_shape`` is ``[N, C, *spatial]`` or unbatched ``[C, *spatial]``. ``padding`` is
        resolved as PyTorch does: an int or one int per dimension (symmetric), ``'valid'`` (none)
        or ``'same'`` (stride 1 only; per dimension ``total = d·(k-1)``,
        ``before = total // 2``, ``after = total - before``).
        """
        dims = len(weight_shape) - 2
        if dims not in _CONV:
            raise ValueError(f"weight of shape {tuple(weight_shape)} is not a 1d/2d/3d kernel")
        if len(input_shape) not in (dims + 1, dims + 2):
            raise ValueError(f"input of shape {tuple(input_shape)} for a {dims}d convolution")
        kernel = tuple(int(k) for k in weight_shape[2:])
        in_channels = int(input_shape[-dims - 1])
        if groups < 1 or in_channels != weight_shape[1] * groups or weight_shape[0] % groups:
            raise ValueError(
                f"input channels {in_channels}, weight {tuple(weight_shape)}, groups {groups}"
            )
        stride_ = _tuple(stride, dims, "stride")
        dilation_ = _tuple(dilation, dims, "dilation")
        if min(stride_) < 1 or min(dilation_) < 1 or min(kernel) < 1:
            raise ValueError("stride, dilation and kernel size must be positive")
        if isinstance(padding, str):
            if padding == "valid":
                pads = tuple((0, 0) for _ in range(dims))
            elif padding == "same":
                if max(stride_) != 1:
                    raise ValueError("padding='same' is not supported for strided convolutions")
                totals = [d * (k - 1) for k, d in zip(kernel, dilation_, strict=True)]
                pads = tuple((total // 2, total - total // 2) for total in totals)
            else:
                raise ValueError(f"padding {padding!r}: expected 'same', 'valid' or numbers")
        else:
            pads = tuple((p, p) for p in _tuple(padding, dims, "padding"))
            if min(min(pair) for pair in pads) < 0:
                raise ValueError("padding must be non-negative")
        return cls(in_channels, groups, kernel, stride_, pads, dilation_)

    @property
    def dims(self) -> int:
        """Number of spatial dimensions (1, 2 or 3)."""
        return len(self.kernel_size)

    @property
    def channels_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def in_features(self) -> int:
        """``d_in = C/groups · Π k``: side of one block of ``A`` without the bias row."""
        return self.channels_per_group * math.prod(self.kernel_size)

    def padded_size(self, spatial: Sequence[int]) -> tuple[int, ...]:
        return tuple(s + b + a for s, (b, a) in zip(spatial, self.padding, strict=True))

    def output_size(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Output spatial size for an input of spatial size ``spatial`` (as PyTorch computes it)."""
        out = tuple(
            (p - d * (k - 1) - 1) // s + 1
            for p, k, s, d in zip(
                self.padded_size(spatial), self.kernel_size, self.stride, self.dilation, strict=True
            )
        )
        if min(out) < 1:
            raise ValueError(f"input of spatial size {tuple(spatial)} is smaller than the kernel")
        return out

    def pad(self, x: Tensor) -> Tensor:
        """Zero-pad the spatial dimensions of ``x`` (``x`` itself when there is no padding)."""
        if not any(b or a for b, a in self.padding):
            return x
        return F.pad(x, [p for pair in reversed(self.padding) for p in pair])

    @property
    def correlation_supported(self) -> bool:
        """Every tap on the sub-lattice ``s·Z`` per dimension: stride 1, stride dividing the
        dilation, or a kernel size 1 (see the module doc)."""
        return all(
            s == 1 or k == 1 or d % s == 0
            for k, s, d in zip(self.kernel_size, self.stride, self.dilation, strict=True)
        )


def _check_input(x: Tensor, geometry: ConvGeometry) -> None:
    dims = geometry.dims
    if x.dim() != dims + 2 or x.shape[1] != geometry.in_channels:
        raise ValueError(
            f"expected a batched input [N, {geometry.in_channels}, {dims} spatial], "
            f"got {tuple(x.shape)} (unsqueeze unbatched input)"
        )


def patch_view(x: Tensor, geometry: ConvGeometry) -> Tensor:
    """Input ``[N, C, *spatial]`` -> zero-copy strided view ``[N, *out, groups, C/groups, *k]``.

    Element ``[n, *t, g]`` is the patch that group ``g`` of the convolution multiplies at output
    location ``t``; flattening its trailing dimensions gives the channel-major order of
    ``weight.view(out_channels, -1)``. The view is into the padded copy of ``x`` when there is
    padding, into ``x`` otherwise.
    """
    _check_input(x, geometry)
    dims = geometry.dims
    view = geometry.pad(x)
    # unfold(dim, size, step) is a view; a dilated kernel spans (k - 1)·d + 1 inputs.
    for axis, (k, s, d) in enumerate(
        zip(geometry.kernel_size, geometry.stride, geometry.dilation, strict=True), start=2
    ):
        view = view.unfold(axis, (k - 1) * d + 1, s)
    taps = tuple(slice(None, None, d) for d in geometry.dilation)
    view = view[(..., *taps)]  # [N, C, *out, *k]
    view = view.unflatten(1, (geometry.groups, geometry.channels_per_group))
    # [N, G, Cg, *out, *k] -> [N, *out, G, Cg, *k]
    order = [0, *range(3, 3 + dims), 1, 2, *range(3 + dims, 3 + 2 * dims)]
    return view.permute(order)


def patch_rows(x: Tensor, geometry: ConvGeometry, index: Tensor | None = None) -> Tensor:
    """Patch rows ``[groups, M, d_in]`` in ``(n, location)`` order (locations row-major).

    ``M = N·T`` for all rows; with ``index`` (flat indices into ``N·T``) only those rows, gathered
    straight from the input without copying the others.
    """
    view = patch_view(x, geometry)
    dims = geometry.dims
    groups, d_in = geometry.groups, geometry.in_features
    if index is None:
        rows = view.reshape(-1, groups, d_in)  # the one copy
    else:
        out = view.shape[1 : 1 + dims]
        n, location = index // math.prod(out), index % math.prod(out)
        rows = view[(n, *torch.unravel_index(location, out))].reshape(-1, groups, d_in)
    return rows.transpose(0, 1)


def _window_sums(padded: Tensor, geometry: ConvGeometry) -> Tensor:
    """``[N, C, *P]`` padded input -> ``[N, C, *k]``: ``Σ_t x̃[n, c, t·s + o·d]`` per offset ``o``,
    one spatial dimension at a time (no patch copy)."""
    sums = padded
    for k, s, d in zip(geometry.kernel_size, geometry.stride, geometry.dilation, strict=True):
        # axis 2 is always the next untouched spatial dimension: earlier ones were summed away
        # and their offsets appended at the end.
        windows = sums.unfold(2, (k - 1) * d + 1, s)[..., ::d]  # [N, C, O, ..., k_prev, k]
        sums = windows.sum(2)
    return sums


def patch_sums_per_sample(x: Tensor, geometry: ConvGeometry) -> Tensor:
    """``Σ_t a_{n,t}`` per sample, shape ``[groups, N, d_in]`` (for K-FAC-reduce and the bias
    row of ``A``). Cost ``O(N · C · Π k · Π P)``, no patch matrix."""
    _check_input(x, geometry)
    sums = _window_sums(geometry.pad(x), geometry)  # [N, C, *k]
    return sums.reshape(x.shape[0], geometry.groups, geometry.in_features).transpose(0, 1)


def choose_method(
    geometry: ConvGeometry, input_shape: Sequence[int], threads: int | None = None
) -> CovarianceMethod:
    """The method ``auto`` uses for this convolution, batched input shape and number of intra-op
    threads (default ``torch.get_num_threads()``); the rule and its measurements are in the
    module doc."""
    if (
        not geometry.correlation_supported
        or math.prod(geometry.kernel_size) == 1
        or geometry.dims > 2
        or geometry.groups > 1
    ):
        return CovarianceMethod.GEMM
    threads = torch.get_num_threads() if threads is None else threads
    ratio, least = AUTO_RULE[1] if threads <= 1 else AUTO_RULE[2]
    gemm = patch_covariance_flops(geometry, input_shape, CovarianceMethod.GEMM)
    correlation = patch_covariance_flops(geometry, input_shape, CovarianceMethod.CORRELATION)
    if correlation < ratio * gemm and gemm >= least:
        return CovarianceMethod.CORRELATION
    return CovarianceMethod.GEMM


def _resolve(
    method: CovarianceMethod | str, geometry: ConvGeometry, input_shape: Sequence[int]
) -> CovarianceMethod:
    method = CovarianceMethod(method)
    if method is CovarianceMethod.AUTO:
        return choose_method(geometry, input_shape)
    if method is CovarianceMethod.CORRELATION and not geometry.correlation_supported:
        raise ValueError(
            f"method 'correlation' needs each stride to be 1, to divide the dilation or to go "
            f"with a kernel size of 1; got stride {geometry.stride}, dilation "
            f"{geometry.dilation}, kernel {geometry.kernel_size} (use 'gemm' or 'auto')"
        )
    return method


def _sublattice(geometry: ConvGeometry) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Strides and dilations of the equivalent stride-1 convolution of ``x̃[::s]``: the
    subsampling step per dimension and the reduced dilation ``d / s`` (1 for ``k = 1``)."""
    steps = tuple(geometry.stride)
    dilations = tuple(
        1 if k == 1 else d // s
        for k, s, d in zip(geometry.kernel_size, geometry.stride, geometry.dilation, strict=True)
    )
    return steps, dilations


def patch_covariance_flops(
    geometry: ConvGeometry,
    input_shape: Sequence[int],
    method: CovarianceMethod | str = CovarianceMethod.AUTO,
) -> float:
    """FLOP model of ``Σ_{n,t} a a^T`` (all groups, without the bias row) by ``method``.

    ``gemm``: ``2 · groups · N·T · d_in²``. ``correlation``: for each set ``E`` of border
    dimensions, the correlation ``2 · 2^|E| · groups · (C_g Π_{E} m_i)² · N · Π_{F} P_i ·
    k_f Π_{F \\ f} (2k_i - 1)`` (``F`` the other dimensions, ``f`` the first of them, whose
    shifts are computed for ``Δ ≥ 0`` only; ``P`` the padded sub-lattice size, ``m = (k-1)·d``).
    Plus the assembly, one product ``[G·C_g², columns] @ [columns, (Π k)²]`` with ``columns``
    the number of correlations per channel pair over all terms. Copies are not counted.
    ``auto``: the FLOPs of the method it picks.
    """
    shape = tuple(input_shape)
    if len(shape) == geometry.dims + 1:
        shape = (1, *shape)
    batch, spatial = shape[0], shape[2:]
    method = _resolve(method, geometry, shape)
    groups, cg = geometry.groups, geometry.channels_per_group
    if method is CovarianceMethod.GEMM:
        locations = math.prod(geometry.output_size(spatial))
        return 2.0 * groups * batch * locations * geometry.in_features**2
    steps, dilations = _sublattice(geometry)
    sizes = [-(-p // s) for p, s in zip(geometry.padded_size(spatial), steps, strict=True)]
    kernel = geometry.kernel_size
    margins = [(k - 1) * d for k, d in zip(kernel, dilations, strict=True)]
    total = 0.0
    columns = 0
    for edges in _edge_sets(margins):
        full = [i for i in range(len(kernel)) if i not in edges]
        sides = 2 ** len(edges)
        rows = cg * math.prod(margins[i] for i in edges)
        positions = math.prod(sizes[i] for i in full)
        # the first full dimension only for Δ ≥ 0 (k shifts), the others for all 2k - 1
        shifts = math.prod(kernel[i] if j == 0 else 2 * kernel[i] - 1 for j, i in enumerate(full))
        total += 2.0 * sides * groups * rows**2 * batch * positions * shifts
        columns += sides * math.prod(margins[i] ** 2 for i in edges) * shifts
    # assembly: [G·Cg², columns] @ [columns, (Π k)²]
    total += 2.0 * groups * cg**2 * columns * math.prod(kernel) ** 2
    return total


def _edge_sets(margins: Sequence[int]) -> list[tuple[int, ...]]:
    """Sets ``E`` of dimensions with a border factor; dimensions with ``m = 0`` have none."""
    active = [i for i, m in enumerate(margins) if m > 0]
    return [
        combo for size in range(len(active) + 1) for combo in itertools.combinations(active, size)
    ]


@contextlib.contextmanager
def _ieee_float32_convolutions(device: torch.device) -> Iterator[None]:
    """cuDNN convolutions default to TF32 for float32 on Ampere and newer (10-bit mantissa),
    matrix products do not: disable it while the correlations run, so that both methods give
    float32 results (restored afterwards)."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def _term_axes(edges: tuple[int, ...], dims: int) -> tuple[list[tuple[int, str]], int | None]:
    """The ``src`` axes of a term's correlations as ``(dimension, kind)``, in the order its
    construction holds them (copying them is then cheap), and its ``half`` dimension."""
    full = [i for i in range(dims) if i not in edges]
    if len(full) >= 2:  # convolution output: [(c, r_E), (side_E, g, c', r'_E), δ_F]
        kinds = ["side", "left", "right", "shift"]
    else:  # batched product: [side_E, g, (c, r_E, δ_F), (r'_E, c')]
        kinds = ["side", "left", "shift", "right"]
    axes = [(i, kind) for kind in kinds for i in (full if kind == "shift" else edges)]
    return axes, (full[0] if full else None)


def _term_correlation(
    transposed: Tensor,
    edges: tuple[int, ...],
    kernel: Sequence[int],
    margins: Sequence[int],
    dilations: Sequence[int],
    extended: Tensor | None = None,
) -> Tensor:
    """Correlations of one inclusion-exclusion term, as a view ``[*src, G, Cg, Cg']`` with the
    ``src`` axes of :func:`_term_axes`.

    ``transposed`` is the padded (sub-lattice) input as ``[G, Cg, N, *P]``. A border dimension
    ``i ∈ E`` contributes the axes ``side``, ``left`` and ``right`` of sizes ``2, m, m``: the pair
    of positions ``(r, r')`` in its first (side 0) or last (side 1) ``m`` slices; a full dimension
    the ``shift`` axis ``δ`` with ``Δ = (δ - (k-1))·d``, except the first full dimension
    (``half``), correlated for ``Δ = δ·d ≥ 0`` only (``S_{-Δ}[c, c'] = S_Δ[c', c]``
    gives the rest). ``extended``, if given, is ``transposed`` followed by ``m`` zero slices
    along the first dimension (a single group): the main term's shifted operand without a copy.

    With two or more full dimensions the correlation is one grouped convolution (channels and
    border positions as its batch, samples as its input channels, the two sides of each border
    dimension and the groups as its groups). With at most one full dimension the shifted windows
    are copied (``shifts ×`` a thin slab) and multiplied in one batched matrix product, which
    measured 1.1-2.6× faster than the equivalent thin grouped convolution here.
    """
    groups, cg, batch = transposed.shape[:3]
    sizes = transposed.shape[3:]
    dims = len(sizes)
    full = [i for i in range(dims) if i not in edges]
    e, f = len(edges), len(full)
    blocks = 2**e * groups  # independent correlations: sides of every border dimension, groups
    rows = cg * math.prod(margins[i] for i in edges)
    full_sizes = [sizes[i] for i in full]
    edge_sizes = [margins[i] for i in edges]
    strides = [dilations[i] for i in full]
    shifts = [kernel[i] if j == 0 else 2 * kernel[i] - 1 for j, i in enumerate(full)]
    # The shifted operand is zero-padded by m on both sides of each full dimension, except the
    # first one: on its trailing side only, so that its correlation holds the shifts Δ ≥ 0.
    half_pad = [0] * (2 * f)
    if f:
        half_pad[2 * f - 1] = margins[full[0]]  # F.pad order: last dimension first

    def slabs() -> Iterator[tuple[tuple[int, ...], Tensor]]:
        """Each combination of sides and its slab ``[G, Cg, *m_E, N, *P_F]`` (a view)."""
        for sides in itertools.product((0, 1), repeat=e):
            view = transposed
            for side, i in zip(sides, edges, strict=True):
                start = 0 if side == 0 else sizes[i] - margins[i]
                view = view.narrow(3 + i, start, margins[i])
            order = [0, 1, *(3 + i for i in edges), 2, *(3 + i for i in full)]
            yield sides, view.permute(order)

    if f >= 2:  # conv: input [(c, r_E), (sides, g, n), *P_F], filters [(sides, g, c, r_E), n, *P_F]
        if e == 0:
            weight = transposed.reshape(groups * cg, batch, *full_sizes)  # a view
            if extended is not None:
                inputs, half_pad = extended.view(cg, batch, *extended.shape[3:]), [0] * (2 * f)
            else:
                inputs = transposed.transpose(0, 1).reshape(cg, groups * batch, *full_sizes)
        else:
            weight = transposed.new_empty(*([2] * e), groups, cg, *edge_sizes, batch, *full_sizes)
            inputs = transposed.new_empty(cg, *edge_sizes, *([2] * e), groups, batch, *full_sizes)
            for sides, slab in slabs():
                weight[sides].copy_(slab)
                inputs[(slice(None),) * (1 + e) + sides].copy_(slab.movedim(0, 1 + e))
            weight = weight.view(blocks * rows, batch, *full_sizes)
            inputs = inputs.view(rows, blocks * batch, *full_sizes)
        raw = _CONV[f](
            F.pad(inputs, half_pad) if any(half_pad) else inputs,
            weight,
            stride=strides,
            padding=[0, *(margins[i] for i in full[1:])],
            groups=blocks,
        )
        raw = raw.view(cg, *edge_sizes, *([2] * e), groups, cg, *edge_sizes, *shifts)
        g_out, c_out, c2_out = 1 + 2 * e, 0, 2 + 2 * e
        position = {(i, "left"): 1 + j for j, i in enumerate(edges)}
        position |= {(i, "side"): 1 + e + j for j, i in enumerate(edges)}
        position |= {(i, "right"): 3 + 2 * e + j for j, i in enumerate(edges)}
        position |= {(i, "shift"): 3 + 3 * e + j for j, i in enumerate(full)}
    else:  # copied windows: [blocks, (c, r_E, δ), (n, u)] @ [blocks, (n, u), (r'_E, c')]
        pad_after = margins[full[0]] if f else 0
        padded_sizes = [p + pad_after for p in full_sizes]
        shifted = transposed.new_zeros(*([2] * e), groups, cg, *edge_sizes, batch, *padded_sizes)
        right = transposed.new_empty(*([2] * e), groups, *edge_sizes, cg, batch, *full_sizes)
        interior = tuple(slice(0, p) for p in full_sizes)
        for sides, slab in slabs():
            shifted[(*sides, ..., *interior)].copy_(slab)
            right[sides].copy_(slab.movedim(1, 1 + e))
        windows = shifted.view(blocks, rows, batch, *padded_sizes)
        if f:  # [blocks, rows, N, shifts, P] (a view)
            windows = windows.unfold(3, full_sizes[0], strides[0])
            windows = windows.permute(0, 1, 3, 2, 4)
        left = windows.reshape(blocks, rows * math.prod(shifts), -1)  # the one copy
        raw = left @ right.view(blocks, rows, -1).transpose(1, 2)
        raw = raw.view(*([2] * e), groups, cg, *edge_sizes, *shifts, *edge_sizes, cg)
        g_out, c_out, c2_out = e, e + 1, 3 * e + 2 + f
        position = {(i, "side"): j for j, i in enumerate(edges)}
        position |= {(i, "left"): e + 2 + j for j, i in enumerate(edges)}
        position |= {(i, "shift"): 2 * e + 2 + j for j, i in enumerate(full)}
        position |= {(i, "right"): 2 * e + 2 + f + j for j, i in enumerate(edges)}
    axes, _ = _term_axes(edges, dims)
    return raw.permute([*(position[axis] for axis in axes), g_out, c_out, c2_out])


def _term_selection(
    kernel: Sequence[int],
    margins: Sequence[int],
    dilations: Sequence[int],
    axes: list[tuple[int, str]],
    half: int | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """0/1 map ``T[o_1..o_D, o'_1..o'_D, *src]`` from a term's correlations (``src`` axes as
    described by ``axes``, see :func:`_term_correlation`) to its value at the pair ``(o, o')``.

    A product over dimensions of: for a full dimension ``δ = o - o' + k - 1`` (``δ = o - o'``,
    only ``o ≥ o'``, for the ``half`` one); for a border dimension, with ``λ = r - o·d`` and
    ``λ' = r' - o'·d``, ``λ = λ'`` and ``λ < 0`` on side 0 (virtual locations ``t = λ < 0``),
    ``λ ≥ 0`` on side 1 (``t = O + λ``): each pair sums one diagonal of the slab pairs.
    """
    dims = len(kernel)
    edges = {i for i, kind in axes if kind != "shift"}
    factors, names = [], []
    for i, (k, d) in enumerate(zip(kernel, dilations, strict=True)):
        o = torch.arange(k, device=device)
        if i in edges:
            lag = torch.arange(margins[i], device=device).view(1, -1) - (o * d).view(-1, 1)
            left, right = lag[:, None, :, None], lag[None, :, None, :]  # [k, k, m, m]
            same = left == right
            select = torch.stack([same & (left < 0), same & (left >= 0)], dim=2)
            names += [(i, "o"), (i, "o'"), (i, "side"), (i, "left"), (i, "right")]
        else:
            difference = o.view(-1, 1, 1) - o.view(1, -1, 1)
            if i == half:
                select = torch.arange(k, device=device) == difference
            else:
                select = torch.arange(2 * k - 1, device=device) == difference + k - 1
            names += [(i, "o"), (i, "o'"), (i, "shift")]
        factors.append(select.to(dtype))
    selection = factors[0]
    for factor in factors[1:]:
        selection = selection[(..., *([None] * factor.dim()))] * factor
    wanted = [(i, "o") for i in range(dims)] + [(i, "o'") for i in range(dims)] + axes
    return selection.permute([names.index(name) for name in wanted])


@functools.lru_cache(maxsize=64)
def _selection_matrix(
    kernel: tuple[int, ...],
    margins: tuple[int, ...],
    dilations: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """``M [(o..., o'...), columns]``: the signed, weighted selections of all terms side by side
    (terms in :func:`_edge_sets` order). A term counts for ``o_h > o'_h`` in its ``half``
    dimension, ½ for ``o_h = o'_h`` (½ everywhere without one): ``D + D^T`` then sums it once
    for every pair. Cached per geometry; do not modify."""
    dims, taps = len(kernel), math.prod(kernel)
    selections = []
    for edges in _edge_sets(margins):
        axes, half = _term_axes(edges, dims)
        selection = _term_selection(
            kernel, margins, dilations, axes, half, device=device, dtype=dtype
        )
        if half is None:
            weight = torch.full((), 0.5, dtype=dtype, device=device)
        else:
            offset = torch.arange(kernel[half], device=device)
            left, right = [1] * (2 * dims), [1] * (2 * dims)
            left[half] = right[dims + half] = kernel[half]
            weight = 0.5 * (offset.view(left) >= offset.view(right)).to(dtype)
            weight += 0.5 * (offset.view(left) > offset.view(right)).to(dtype)
            weight = weight.view(*weight.shape, *([1] * len(axes)))
        sign = -1.0 if len(edges) % 2 else 1.0
        selections.append((sign * selection * weight).reshape(taps * taps, -1))
    return torch.cat(selections, dim=1)


def _transposed_padded(
    x: Tensor, geometry: ConvGeometry, steps: Sequence[int], trailing: int
) -> Tensor:
    """The zero-padded input on the sub-lattice ``s·Z`` as ``[G, Cg, N, *P]``, with ``trailing``
    more zero slices at the end of the first spatial dimension (one copy)."""
    spatial = x.shape[2:]
    source = x.unflatten(1, (geometry.groups, geometry.channels_per_group))
    source = source.permute(1, 2, 0, *range(3, 3 + len(spatial)))
    # input position u lands at padded position u + before; keep those ≡ 0 (mod s)
    starts, kept, sizes = [], [], []
    for (before, after), s, size in zip(geometry.padding, steps, spatial, strict=True):
        first = -before % s  # first input index u with (u + before) % s == 0
        starts.append((first + before) // s)
        kept.append(slice(first, size, s))
        sizes.append(-(-(before + size + after) // s))
    sizes[0] += trailing
    view = source[(..., *kept)]
    if tuple(view.shape[3:]) == tuple(sizes):  # no padding at all
        return view.contiguous()
    # Zero-filling all of it measured faster than zeroing the (thin, strided) borders only.
    out = x.new_zeros(*source.shape[:3], *sizes)
    box = (slice(start, start + count) for start, count in zip(starts, view.shape[3:], strict=True))
    out[(..., *box)].copy_(view)
    return out


def _correlation_covariance(x: Tensor, geometry: ConvGeometry) -> Tensor:
    """``Σ_{n,t} a a^T`` per group, ``[groups, d_in, d_in]``, by shifted correlations.

    Every term's correlations are copied one above the other into ``Q [columns, G·Cg·Cg']``
    (channel pairs contiguous, so the copies move whole rows); one product with the signed 0/1
    selections ``M [pairs, columns]`` sums all terms for every offset pair. Each term is
    evaluated for half the offset pairs only (``o_h ≥ o'_h`` in its ``half`` dimension, weight
    ½ on ``o_h = o'_h``; ½ everywhere without one), and ``A = D + D^T``: the result is exactly
    symmetric.
    """
    dims = geometry.dims
    steps, dilations = _sublattice(geometry)
    groups, cg, kernel = geometry.groups, geometry.channels_per_group, geometry.kernel_size
    margins = [(k - 1) * d for k, d in zip(kernel, dilations, strict=True)]
    # The main term's shifted operand needs m more zeros after the first dimension: allocate
    # them with the transposed input, so that it needs no padded copy (groups = 1).
    trailing = margins[0] if dims >= 2 and groups == 1 else 0
    extended = _transposed_padded(x, geometry, steps, trailing)
    transposed = extended.narrow(3, 0, extended.shape[3] - trailing)
    taps = math.prod(kernel)
    selection = _selection_matrix(
        tuple(kernel), tuple(margins), tuple(dilations), x.dtype, x.device
    )
    stacked = x.new_empty(selection.shape[1], groups * cg * cg)  # Q
    start = 0
    with _ieee_float32_convolutions(x.device):
        for edges in _edge_sets(margins):
            correlation = _term_correlation(
                transposed, edges, kernel, margins, dilations, extended if trailing else None
            )
            width = math.prod(correlation.shape[:-3])
            stacked[start : start + width].view(correlation.shape).copy_(correlation)
            start += width
    half_sum = stacked.T @ selection.T  # [G·Cg·Cg', (o..., o'...)]
    half_sum = half_sum.view(groups, cg, cg, taps, taps)
    full = half_sum.permute(0, 1, 3, 2, 4) + half_sum.permute(0, 2, 4, 1, 3)
    return full.reshape(groups, geometry.in_features, geometry.in_features)


def patch_covariance_sum(
    x: Tensor,
    geometry: ConvGeometry,
    *,
    append_ones: bool,
    method: CovarianceMethod | str = CovarianceMethod.AUTO,
) -> Tensor:
    """KFC's ``Σ_{n,t} a_{n,t} a_{n,t}^T`` per group, shape ``[groups, d, d]``.

    ``x`` is the batched input ``[N, C, *spatial]`` (detached; nothing here is differentiated).
    ``d = d_in``, or ``d_in + 1`` with ``append_ones``: then the last row/column is
    ``Σ_{n,t} a_{n,t}`` and the corner ``N·T``, exactly as
    :func:`~lightning_kfac.kfac.linalg.covariance_sum` of the patch rows. ``method`` picks the
    construction (module doc); all give the same matrix up to round-off.
    """
    _check_input(x, geometry)
    x = x.detach()
    method = _resolve(method, geometry, tuple(x.shape))
    if method is CovarianceMethod.GEMM:
        return covariance_sum(patch_rows(x, geometry), append_ones=append_ones)
    gram = _correlation_covariance(x, geometry)
    if not append_ones:
        return gram
    # Σ_{n,t} a_{n,t} = window sums of Σ_n x̃[n]: sum over the samples first
    column_sum = patch_sums_per_sample(x.sum(0, keepdim=True), geometry)[:, 0]  # [G, d_in]
    return with_ones_row(
        gram, column_sum, x.shape[0] * math.prod(geometry.output_size(x.shape[2:]))
    )
