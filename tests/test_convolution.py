"""Convolution patches and KFC's input factor against an explicit per-location loop (float64)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_kfac.kfac.patches import (
    ConvGeometry,
    CovarianceMethod,
    choose_method,
    patch_covariance_flops,
    patch_covariance_sum,
    patch_rows,
    patch_sums_per_sample,
    patch_view,
)
from tests.helpers import assert_close

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

#: name -> (input shape [N, C, *spatial], conv keywords: kernel, stride, padding, dilation, groups)
CASES: dict[str, tuple[tuple[int, ...], dict]] = {
    # the configurations of tests/test_conv2d.py (zero padding; other modes are applied by
    # nn.Conv2d before F.conv2d), on its 7x8 input
    "plain": ((5, 2, 7, 8), dict(kernel=(3, 3))),
    "stride_padding": ((5, 2, 7, 8), dict(kernel=(3, 3), stride=2, padding=1)),
    "rect_kernel_asym": ((5, 3, 7, 8), dict(kernel=(2, 3), stride=(1, 2), padding=(1, 0))),
    "same_even_kernel": ((5, 2, 7, 8), dict(kernel=(4, 4), padding="same")),
    "same_dilated": ((5, 2, 7, 8), dict(kernel=(3, 3), padding="same", dilation=2)),
    "dilation": ((5, 2, 7, 8), dict(kernel=(3, 3), dilation=(2, 1), padding=2)),
    "groups": ((5, 4, 7, 8), dict(kernel=(3, 3), groups=2, padding=1)),
    "depthwise": ((5, 3, 7, 8), dict(kernel=(3, 3), groups=3, padding=1)),
    # more shapes
    "same_odd_kernel": ((3, 2, 6, 5), dict(kernel=(5, 3), padding="same")),
    "same_even_odd_kernel": ((3, 2, 6, 7), dict(kernel=(2, 3), padding="same", dilation=(1, 2))),
    "same_even_dilated": ((3, 2, 9, 7), dict(kernel=(4, 2), padding="same", dilation=(2, 3))),
    "valid": ((3, 3, 6, 7), dict(kernel=(3, 2), padding="valid")),
    "one_by_one": ((3, 4, 5, 6), dict(kernel=(1, 1))),
    "one_by_one_stride": ((3, 4, 5, 6), dict(kernel=(1, 1), stride=2)),
    "kernel_larger_than_input": ((3, 2, 3, 2), dict(kernel=(5, 4), padding=(2, 2))),
    "wide_input": ((2, 2, 4, 11), dict(kernel=(3, 3), padding=(1, 2))),
    "non_square_kernel_stride": ((2, 3, 9, 8), dict(kernel=(4, 2), stride=(2, 3), padding=1)),
    "stride_divides_dilation": ((3, 2, 11, 10), dict(kernel=(3, 3), stride=2, dilation=(2, 4))),
    "stride_dilation_odd_padding": (
        (2, 3, 10, 9),
        dict(kernel=(3, 2), stride=(2, 3), dilation=(2, 3), padding=(3, 1)),
    ),
    "stride_two_dilation_three": ((3, 2, 11, 10), dict(kernel=(2, 3), stride=2, dilation=3)),
    "single_sample": ((1, 3, 5, 6), dict(kernel=(3, 3), padding=1)),
    "single_output": ((2, 3, 3, 3), dict(kernel=(3, 3))),
    "big_padding": ((2, 2, 3, 4), dict(kernel=(2, 3), padding=(3, 1), dilation=(1, 2))),
    "groups_stride_dilation": ((2, 6, 9, 9), dict(kernel=(2, 3), groups=3, dilation=2, padding=2)),
    # 1d and 3d
    "conv1d": ((3, 3, 9), dict(kernel=(3,), padding=1)),
    "conv1d_same_even": ((2, 4, 7), dict(kernel=(4,), padding="same", dilation=2, groups=2)),
    "conv1d_stride": ((3, 2, 10), dict(kernel=(3,), stride=3, padding=2)),
    "conv3d": ((2, 2, 4, 5, 3), dict(kernel=(3, 2, 2), padding=1)),
    "conv3d_same": ((2, 2, 4, 3, 5), dict(kernel=(2, 3, 3), padding="same", dilation=(2, 1, 1))),
    "conv3d_stride_groups": ((2, 4, 5, 6, 4), dict(kernel=(2, 3, 1), stride=(1, 1, 2), groups=2)),
    "conv3d_stride": ((2, 2, 5, 4, 4), dict(kernel=(2, 2, 2), stride=(2, 1, 1), padding=1)),
}


def geometry_of(shape: tuple[int, ...], spec: dict) -> tuple[ConvGeometry, tuple[int, ...]]:
    """The geometry and the weight shape of a convolution with 5 output channels per group."""
    groups = spec.get("groups", 1)
    weight_shape = (5 * groups, shape[1] // groups, *spec["kernel"])
    geometry = ConvGeometry.from_call(
        shape,
        weight_shape,
        stride=spec.get("stride", 1),
        padding=spec.get("padding", 0),
        dilation=spec.get("dilation", 1),
        groups=groups,
    )
    return geometry, weight_shape


def loop_rows(x: torch.Tensor, spec: dict) -> torch.Tensor:
    """``[G, N·T, d_in]`` patch rows by a loop over samples, output locations, groups and kernel
    taps, from first principles: F.pad with the padding PyTorch documents, then slicing."""
    dims = x.dim() - 2
    kernel = spec["kernel"]
    as_tuple = lambda v: (v,) * dims if isinstance(v, int) else tuple(v)  # noqa: E731
    stride = as_tuple(spec.get("stride", 1))
    dilation = as_tuple(spec.get("dilation", 1))
    groups = spec.get("groups", 1)
    padding = spec.get("padding", 0)
    if padding == "same":
        pads = [
            (d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2)
            for k, d in zip(kernel, dilation, strict=True)
        ]
    elif padding == "valid":
        pads = [(0, 0)] * dims
    else:
        pads = [(p, p) for p in as_tuple(padding)]
    padded = F.pad(x, [p for pair in reversed(pads) for p in pair])
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilation, strict=True)]
    outs = [(p - span) // s + 1 for p, span, s in zip(padded.shape[2:], spans, stride, strict=True)]
    per_group = x.shape[1] // groups
    rows = []
    for n in range(x.shape[0]):
        for location in itertools.product(*(range(o) for o in outs)):
            patch = torch.stack(
                [
                    padded[
                        (
                            n,
                            slice(None),
                            *(
                                t * s + o * d
                                for t, s, o, d in zip(location, stride, tap, dilation, strict=True)
                            ),
                        )
                    ]
                    for tap in itertools.product(*(range(k) for k in kernel))
                ],
                dim=1,
            )  # [C, taps]: channel-major, taps row-major, as weight.view(out, -1)
            rows.append(patch.reshape(groups, per_group * math.prod(kernel)))
    return torch.stack(rows, dim=1)


def reference_covariance(rows: torch.Tensor, append_ones: bool) -> torch.Tensor:
    if append_ones:
        rows = torch.cat([rows, torch.ones(*rows.shape[:2], 1, dtype=rows.dtype)], dim=-1)
    return torch.einsum("gmi,gmj->gij", rows, rows)


def random_input(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("case", sorted(CASES))
def test_patch_rows_equal_loop_and_reproduce_the_convolution(case: str) -> None:
    shape, spec = CASES[case]
    geometry, weight_shape = geometry_of(shape, spec)
    x = random_input(shape)
    expected = loop_rows(x, spec)
    rows = patch_rows(x, geometry)
    assert torch.equal(rows, expected)
    # The rows are what PyTorch multiplies: conv output = per-group weight @ patch.
    weight = random_input(weight_shape, seed=1)
    conv = CONV[geometry.dims](
        x,
        weight,
        stride=spec.get("stride", 1),
        padding=spec.get("padding", 0),
        dilation=spec.get("dilation", 1),
        groups=geometry.groups,
    )
    out_spatial = conv.shape[2:]
    assert geometry.output_size(shape[2:]) == tuple(out_spatial)
    w = weight.reshape(geometry.groups, -1, geometry.in_features)
    via_rows = (rows @ w.mT).reshape(geometry.groups, shape[0], -1, w.shape[1])
    via_rows = via_rows.permute(1, 0, 3, 2).reshape(conv.shape)
    assert_close(via_rows, conv, rtol=1e-12, atol=1e-12)
    view = patch_view(x, geometry)
    assert view.shape == (
        shape[0],
        *out_spatial,
        geometry.groups,
        shape[1] // geometry.groups,
        *spec["kernel"],
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_sampled_rows_and_per_sample_sums(case: str) -> None:
    shape, spec = CASES[case]
    geometry, _ = geometry_of(shape, spec)
    x = random_input(shape)
    expected = loop_rows(x, spec)
    total = expected.shape[1]
    index = torch.randperm(total, generator=torch.Generator().manual_seed(2))[: max(1, total // 3)]
    index = torch.cat([index, index[:1], torch.tensor([total - 1, 0])])  # repeats and both ends
    assert torch.equal(patch_rows(x, geometry, index), expected[:, index])
    sums = expected.reshape(geometry.groups, shape[0], -1, geometry.in_features).sum(2)
    assert_close(patch_sums_per_sample(x, geometry), sums, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("append_ones", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_covariance_methods_equal_loop(case: str, append_ones: bool) -> None:
    shape, spec = CASES[case]
    geometry, _ = geometry_of(shape, spec)
    x = random_input(shape)
    expected = reference_covariance(loop_rows(x, spec), append_ones)
    scale = float(expected.abs().max())
    methods = [CovarianceMethod.GEMM, CovarianceMethod.AUTO]
    if geometry.correlation_supported:
        methods.append(CovarianceMethod.CORRELATION)
    for method in methods:
        got = patch_covariance_sum(x, geometry, append_ones=append_ones, method=method)
        assert got.dtype == torch.float64
        assert_close(got, expected, rtol=1e-12, atol=1e-12 * scale)
    if not geometry.correlation_supported:
        with pytest.raises(ValueError, match="correlation"):
            patch_covariance_sum(x, geometry, append_ones=append_ones, method="correlation")


def test_correlation_support_follows_the_sublattice_rule() -> None:
    supported = {
        name
        for name, (shape, spec) in CASES.items()
        if geometry_of(shape, spec)[0].correlation_supported
    }
    assert {"stride_divides_dilation", "one_by_one_stride", "conv3d_stride_groups"} <= supported
    unsupported = {"stride_padding", "stride_two_dilation_three", "conv1d_stride", "conv3d_stride"}
    assert not unsupported & supported


def test_correlation_sweep_of_2d_geometries() -> None:
    """Random stride-1 (and stride-dividing-dilation) 2d geometries, correlation vs GEMM."""
    gen = torch.Generator().manual_seed(7)
    draw = lambda low, high: int(torch.randint(low, high + 1, (), generator=gen))  # noqa: E731
    for _ in range(25):
        kernel = (draw(1, 4), draw(1, 4))
        dilation = (draw(1, 3), draw(1, 2))
        stride = tuple(d if draw(0, 3) == 0 else 1 for d in dilation)
        padding = (draw(0, 3), draw(0, 3))
        groups = draw(1, 2)
        spatial = [
            max(draw(1, 7), (k - 1) * d + 1 - 2 * p)
            for k, d, p in zip(kernel, dilation, padding, strict=True)
        ]
        shape = (draw(1, 3), groups * draw(1, 3), *spatial)
        spec = dict(kernel=kernel, stride=stride, padding=padding, dilation=dilation, groups=groups)
        geometry, _ = geometry_of(shape, spec)
        x = random_input(shape, seed=draw(0, 1000))
        expected = patch_covariance_sum(x, geometry, append_ones=True, method="gemm")
        got = patch_covariance_sum(x, geometry, append_ones=True, method="correlation")
        assert_close(got, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))
        assert torch.equal(got, got.mT)  # D + D^T: exactly symmetric


def test_correlation_in_float32_is_float32_accurate() -> None:
    """Border terms are subtracted from full correlations: no cancellation beyond float32."""
    shape, spec = (4, 8, 12, 10), dict(kernel=(3, 3), padding=1)
    geometry, _ = geometry_of(shape, spec)
    x = random_input(shape) + 2.0  # a mean offset, as after a ReLU
    exact = patch_covariance_sum(x, geometry, append_ones=True, method="gemm")
    got = patch_covariance_sum(x.float(), geometry, append_ones=True, method="correlation")
    assert got.dtype == torch.float32
    assert_close(got.double(), exact, rtol=1e-5, atol=1e-5 * float(exact.abs().max()))


def test_from_call_resolves_padding_as_pytorch() -> None:
    geometry = ConvGeometry.from_call(
        (2, 4, 9, 9), (6, 2, 4, 3), padding="same", dilation=(1, 2), groups=2
    )
    assert geometry.padding == ((1, 2), (2, 2))
    assert geometry.in_features == 2 * 4 * 3
    assert ConvGeometry.from_call((4, 9), (6, 4, 3), padding="valid").padding == ((0, 0),)
    assert ConvGeometry.from_call((1, 4, 9, 9, 9), (6, 4, 3, 3, 3), padding=(1, 2, 0)).padding == (
        (1, 1),
        (2, 2),
        (0, 0),
    )
    with pytest.raises(ValueError, match="strided"):
        ConvGeometry.from_call((2, 4, 9, 9), (6, 4, 3, 3), stride=2, padding="same")
    with pytest.raises(ValueError, match="channels"):
        ConvGeometry.from_call((2, 5, 9, 9), (6, 4, 3, 3))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        ConvGeometry.from_call((2, 4, 2, 9), (6, 4, 3, 3)).output_size((2, 9))


def test_flop_models_and_auto_rule() -> None:
    shape = (128, 32, 16, 16)
    stride_one = ConvGeometry.from_call(shape, (64, 32, 3, 3), padding=1)
    stride_two = ConvGeometry.from_call(shape, (64, 32, 3, 3), stride=2, padding=1)
    gemm = patch_covariance_flops(stride_one, shape, "gemm")
    assert gemm == 2.0 * 128 * 16 * 16 * (32 * 9) ** 2
    assert patch_covariance_flops(stride_one, shape, "correlation") < 0.3 * gemm
    assert choose_method(stride_one, shape, threads=1) is CovarianceMethod.CORRELATION
    assert choose_method(stride_one, shape, threads=2) is CovarianceMethod.CORRELATION
    tiny = (8, 3, 32, 32)  # 13 MFLOP of GEMM work: two threads keep the GEMM
    tiny_geometry = ConvGeometry.from_call(tiny, (32, 3, 3, 3), padding=1)
    assert choose_method(tiny_geometry, tiny, threads=1) is CovarianceMethod.CORRELATION
    assert choose_method(tiny_geometry, tiny, threads=2) is CovarianceMethod.GEMM
    assert choose_method(stride_two, shape, threads=1) is CovarianceMethod.GEMM
    assert patch_covariance_flops(stride_two, shape, "auto") == patch_covariance_flops(
        stride_two, shape, "gemm"
    )
    large = (128, 32, 32, 32)
    geometry = ConvGeometry.from_call(large, (32, 32, 3, 3), padding=1)
    assert choose_method(geometry, large, threads=2) is CovarianceMethod.CORRELATION
    one_by_one = ConvGeometry.from_call(shape, (64, 32, 1, 1), stride=2)
    assert choose_method(one_by_one, shape, threads=1) is CovarianceMethod.GEMM
    small_batch = (2, 32, 16, 16)  # FLOP ratio 0.65: the assembly product dominates
    assert choose_method(stride_one, small_batch, threads=1) is CovarianceMethod.GEMM
    small_image = (128, 64, 4, 4)  # FLOP ratio 0.78: border terms dominate
    geometry = ConvGeometry.from_call(small_image, (64, 64, 3, 3), padding=1)
    assert choose_method(geometry, small_image, threads=1) is CovarianceMethod.GEMM


def test_non_contiguous_input() -> None:
    """A channels-last (or otherwise strided) input gives the same patches and factors."""
    shape, spec = CASES["same_even_kernel"]
    geometry, _ = geometry_of(shape, spec)
    x = random_input(shape)
    strided = x.to(memory_format=torch.channels_last)
    assert not strided.is_contiguous()
    assert torch.equal(patch_rows(strided, geometry), patch_rows(x, geometry))
    for method in ("gemm", "correlation"):
        expected = patch_covariance_sum(x, geometry, append_ones=True, method=method)
        got = patch_covariance_sum(strided, geometry, append_ones=True, method=method)
        assert_close(got, expected, rtol=1e-13, atol=1e-13 * float(expected.abs().max()))


def test_auto_rule_avoids_fixed_costs() -> None:
    """Tiny problems stay on the GEMM: the correlation has ~1 ms of fixed costs (60 operations)."""
    for shape in [(2, 3, 4, 4), (1, 3, 32, 32)]:  # FLOP ratio 6.6; 1.5 MFLOP < 10 MFLOP
        geometry = ConvGeometry.from_call(shape, (4, 3, 3, 3), padding=1)
        assert choose_method(geometry, shape, threads=1) is CovarianceMethod.GEMM
    shape = (8, 3, 32, 32)  # 12 MFLOP, FLOP ratio 0.25: measured 1.0x and 2.1x faster
    geometry = ConvGeometry.from_call(shape, (4, 3, 3, 3), padding=1)
    assert choose_method(geometry, shape, threads=1) is CovarianceMethod.CORRELATION
