"""Conv2d factors (KFC, Grosse & Martens 2016) against an explicit per-location patch loop
(``tests/references.py``, the same loop as for Conv1d/3d)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACPreconditioner
from tests.helpers import assert_close, dense_damped_kron_solve
from tests.references import conv_matrix, conv_per_location_reference

pytestmark = pytest.mark.usefixtures("float64")


CASES = {
    "plain": dict(in_channels=2, out_channels=3, kernel_size=3),
    "stride_padding": dict(in_channels=2, out_channels=4, kernel_size=3, stride=2, padding=1),
    "rect_kernel_asym": dict(
        in_channels=3, out_channels=2, kernel_size=(2, 3), stride=(1, 2), padding=(1, 0)
    ),
    "same_even_kernel": dict(in_channels=2, out_channels=3, kernel_size=4, padding="same"),
    "same_dilated": dict(in_channels=2, out_channels=3, kernel_size=3, padding="same", dilation=2),
    "dilation": dict(in_channels=2, out_channels=3, kernel_size=3, dilation=(2, 1), padding=2),
    "groups": dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=1),
    "depthwise": dict(
        in_channels=3, out_channels=3, kernel_size=3, groups=3, padding=1, bias=False
    ),
    "reflect_padding": dict(
        in_channels=2, out_channels=3, kernel_size=3, padding=1, padding_mode="reflect"
    ),
    "no_bias": dict(in_channels=2, out_channels=3, kernel_size=3, bias=False),
}


def conv_model(**conv_kwargs) -> tuple[nn.Module, nn.Conv2d]:
    torch.manual_seed(0)
    conv = nn.Conv2d(**conv_kwargs)
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.LazyLinear(3))
    model(torch.zeros(1, conv.in_channels, 7, 8))  # materialise the lazy head
    return model.double(), conv


@pytest.mark.parametrize("case", sorted(CASES))
def test_conv2d_factors_and_step_equal_per_location_loop(case: str) -> None:
    model, conv = conv_model(**CASES[case])
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, conv.in_channels, 7, 8, generator=gen)
    y = torch.randint(0, 3, (5,), generator=gen)
    A, G, W, _ = conv_per_location_reference(conv, model, x, y)
    pre = KFACPreconditioner(model, damping=1e-2, kl_clip=None)
    F.cross_entropy(model(x), y).backward()
    raw = conv_matrix(conv)
    assert_close(raw, W, rtol=1e-9, atol=1e-12)
    pre.step()
    layer = pre.block("0.weight")
    assert_close(layer.a.value, A, rtol=1e-10, atol=1e-12)
    assert_close(layer.g.value, G, rtol=1e-10, atol=1e-12)
    got = conv_matrix(conv)
    for group in range(conv.groups):
        expected = dense_damped_kron_solve(A[group], G[group], W[group], 1e-2)
        assert_close(got[group], expected, rtol=1e-7, atol=1e-10)


def test_one_by_one_conv_on_one_by_one_input_equals_linear() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(5, 4)
    conv = nn.Conv2d(5, 4, kernel_size=1)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.view(4, 5, 1, 1))
        conv.bias.copy_(linear.bias)
    x = torch.randn(6, 5)
    y = torch.randint(0, 4, (6,))
    results = []
    for model, inputs in (
        (nn.Sequential(linear), x),
        (nn.Sequential(conv, nn.Flatten()), x.view(6, 5, 1, 1)),
    ):
        pre = KFACPreconditioner(model, damping=1e-3, kl_clip=None)
        F.cross_entropy(model(inputs), y).backward()
        pre.step()
        layer = pre.block("0.weight")
        results.append((layer.a.value, layer.g.value, pre.gradient_matrix(layer)))
    for from_linear, from_conv in zip(*results, strict=True):
        assert_close(from_conv, from_linear, rtol=1e-12, atol=1e-14)
