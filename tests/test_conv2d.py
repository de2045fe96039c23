"""Conv2d factors (KFC, Grosse & Martens 2016) against an explicit per-location patch loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACPreconditioner
from tests.helpers import assert_close, dense_damped_kron_solve


@pytest.fixture(autouse=True)
def _float64_default() -> None:
    """Modules built in these tests are float64 (restored by conftest after each test)."""
    torch.set_default_dtype(torch.float64)


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


def explicit_padding(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Pad ``x`` as the convolution does, from first principles (not from module internals)."""
    if conv.padding == "same":
        pads = []
        for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation), strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
    elif conv.padding == "valid":
        pads = [0, 0, 0, 0]
    else:
        ph, pw = conv.padding
        pads = [pw, pw, ph, ph]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, pads, mode=mode)


def per_location_reference(
    conv: nn.Conv2d, model: nn.Module, x: torch.Tensor, y: torch.Tensor, bias: bool
):
    """``A``, ``G``, ``dW`` per group by a loop over samples, output locations and kernel taps."""
    outputs = {}

    def keep_output(module, inputs, output) -> None:
        output.retain_grad()
        outputs["s"] = output

    handle = conv.register_forward_hook(keep_output)
    count, groups = x.shape[0], conv.groups
    cin_g, cout_g = conv.in_channels // groups, conv.out_channels // groups
    kh, kw = conv.kernel_size
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    A = G = W = None
    try:
        for n in range(count):
            loss = F.cross_entropy(model(x[n : n + 1]), y[n : n + 1])
            (g_out,) = torch.autograd.grad(loss, outputs["s"])  # per-sample ∂l_n/∂s_n
            s = outputs["s"].detach()[0]
            xp = explicit_padding(conv, x[n : n + 1])[0]
            _, out_h, out_w = s.shape
            for group in range(groups):
                channels = slice(group * cin_g, (group + 1) * cin_g)
                outs = slice(group * cout_g, (group + 1) * cout_g)
                for i in range(out_h):
                    for j in range(out_w):
                        patch = torch.stack(
                            [
                                xp[channels, i * sh + p * dh, j * sw + q * dw]
                                for p in range(kh)
                                for q in range(kw)
                            ],
                            dim=1,
                        ).reshape(-1)  # channel-major, as weight.view(out, -1)
                        # The patch really is what the convolution sees at (i, j):
                        w = conv.weight[outs].detach().reshape(cout_g, -1)
                        conv_out = w @ patch + (
                            conv.bias[outs].detach() if conv.bias is not None else 0
                        )
                        assert_close(s[outs, i, j], conv_out, rtol=1e-10, atol=1e-12)
                        a = torch.cat([patch, torch.ones(1)]) if bias else patch
                        g = g_out[0, outs, i, j]
                        if A is None:
                            A = torch.zeros(groups, a.numel(), a.numel())
                            G = torch.zeros(groups, g.numel(), g.numel())
                            W = torch.zeros(groups, g.numel(), a.numel())
                        A[group] += torch.outer(a, a)
                        G[group] += torch.outer(g, g)
                        W[group] += torch.outer(g, a)
    finally:
        handle.remove()
    locations = out_h * out_w
    return A / (count * locations), G / count, W / count


def _conv_matrix(conv: nn.Conv2d) -> torch.Tensor:
    """``[W b]`` gradient per group, ``[groups, out/groups, in/groups·kh·kw (+1)]``."""
    groups = conv.groups
    weight = conv.weight.grad.reshape(groups, conv.out_channels // groups, -1)
    if conv.bias is None:
        return weight
    return torch.cat([weight, conv.bias.grad.reshape(groups, -1, 1)], dim=-1)


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
    bias = conv.bias is not None
    A, G, W = per_location_reference(conv, model, x, y, bias)
    pre = KFACPreconditioner(model, damping=1e-2, kl_clip=None)
    F.cross_entropy(model(x), y).backward()
    raw = _conv_matrix(conv)
    assert_close(raw, W, rtol=1e-9, atol=1e-12)
    pre.step()
    layer = pre.block("0.weight")
    assert_close(layer.a.value, A, rtol=1e-10, atol=1e-12)
    assert_close(layer.g.value, G, rtol=1e-10, atol=1e-12)
    got = _conv_matrix(conv)
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
