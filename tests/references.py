"""Dense references, independent of the library, shared by the tests.

Per-sample loops that run each sample alone and differentiate its loss with
``torch.autograd.grad`` (``g_n = ∂l_n/∂s``, docs/design.md §2), the expand and reduce factor
formulas, the explicit per-location patch loop of a convolution, ``[W b]`` gradient matrices, a
training helper that keeps the weights fixed, and HF GPT-2's ``Conv1D`` as written there.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kfac import KFACPreconditioner
from tests.helpers import assert_close

DAMPING = 1e-2
FACTOR_RTOL, FACTOR_ATOL = 1e-10, 1e-13
STEP_RTOL, STEP_ATOL = 1e-7, 1e-10

Rows = list[tuple[Tensor, Tensor]]  # per sample: (a rows [R, d_a], g rows [R, d_g])


# -- per-sample gradients and the factor formulas --------------------------------------------
def assert_differs(actual: Tensor, wrong: Tensor, *, rel: float = 1e-6) -> None:
    """The passing comparison could fail: a deliberately wrong reference is clearly off."""
    actual, wrong = actual.detach(), wrong.detach().to(actual.dtype)
    assert actual.shape == wrong.shape
    scale = float(wrong.abs().max().clamp_min(1e-300))
    assert float((actual - wrong).abs().max()) > rel * scale, "the wrong reference agrees too"


class Recorder:
    """Forward hooks keeping each call's input (positional or keyword) and output."""

    def __init__(self, **modules: nn.Module) -> None:
        self.calls: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in modules}
        self.handles = [
            module.register_forward_hook(functools.partial(self._keep, name), with_kwargs=True)
            for name, module in modules.items()
        ]

    def _keep(self, name: str, module: nn.Module, args, kwargs, output) -> None:
        x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
        self.calls[name].append((x.detach(), output))

    def per_sample(
        self, count: int, sample_loss: Callable[[int], Tensor]
    ) -> dict[str, list[list[tuple[Tensor, Tensor]]]]:
        """``{module: [per sample n: [per call: (input, ∂l_n/∂output)]]}``: each sample alone."""
        out: dict[str, list[list[tuple[Tensor, Tensor]]]] = {name: [] for name in self.calls}
        try:
            for n in range(count):
                for calls in self.calls.values():
                    calls.clear()
                loss = sample_loss(n)
                outputs = [o for calls in self.calls.values() for _, o in calls]
                grads = iter(torch.autograd.grad(loss, outputs))
                for name, calls in self.calls.items():
                    out[name].append([(x, next(grads).detach()) for x, _ in calls])
        finally:
            for handle in self.handles:
                handle.remove()
        return out


def linear_rows(calls: list[tuple[Tensor, Tensor]], *, bias: bool) -> tuple[Tensor, Tensor]:
    """One sample's calls of ``s = W x + b`` as rows ``a = [x; 1]`` and ``g`` (all calls)."""
    a = torch.cat([x.reshape(-1, x.shape[-1]) for x, _ in calls])
    g = torch.cat([g.reshape(-1, g.shape[-1]) for _, g in calls])
    if bias:
        a = torch.cat([a, torch.ones(a.shape[0], 1)], dim=1)
    return a, g


def expand_reference(rows: Rows) -> tuple[Tensor, Tensor, Tensor]:
    """``A = Σ_{n,t} a aᵀ / (N T)``, ``G = Σ_{n,t} g gᵀ / N``, ``dW = Σ_{n,t} g aᵀ / N``."""
    count, positions = len(rows), rows[0][0].shape[0]
    A = sum(a.T @ a for a, _ in rows) / (count * positions)
    G = sum(g.T @ g for _, g in rows) / count
    dW = sum(g.T @ a for a, g in rows) / count
    return A, G, dW


def reduce_reference(rows: Rows) -> tuple[Tensor, Tensor, Tensor]:
    """Reduce: ``a_n = (1/T) Σ_t a``, ``g_n = Σ_t g``, ``A = (1/N) Σ a_n a_nᵀ``,
    ``G = (1/N) Σ g_n g_nᵀ``."""
    count = len(rows)
    A = sum(torch.outer(a.mean(0), a.mean(0)) for a, _ in rows) / count
    G = sum(torch.outer(g.sum(0), g.sum(0)) for _, g in rows) / count
    dW = sum(g.T @ a for a, g in rows) / count
    return A, G, dW


def linear_matrix(layer: nn.Module) -> Tensor:
    """``[W b]`` of ``.grad`` (raw before ``step()``, preconditioned after)."""
    if getattr(layer, "bias", None) is None:
        return layer.weight.grad.clone()
    return torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)


def train_step(
    model: nn.Module, loss_of: Callable[[nn.Module], Tensor], *, steps: int = 1, **options
) -> KFACPreconditioner:
    """K-FAC steps on ``model`` (KL-clip off, no optimizer: the weights do not change):
    ``steps`` times forward, backward, ``pre.step()`` on the same batch, so the running averages
    of the factors stay at the batch's factors and the last ``.grad`` is the step to check."""
    options.setdefault("damping", DAMPING)
    pre = KFACPreconditioner(model, kl_clip=None, **options)
    for _ in range(steps):
        model.zero_grad()
        loss_of(model).backward()
        pre.step()
    return pre


# -- convolutions: the per-location patch loop ----------------------------------------------------
def explicit_padding(conv: nn.Module, x: Tensor) -> Tensor:
    """Pad ``x`` as the convolution does, from first principles (``'same'``: extra at the end)."""
    dims = x.dim() - 2
    if conv.padding == "same":
        pairs = []
        for k, d in zip(conv.kernel_size, conv.dilation, strict=True):
            total = d * (k - 1)
            pairs.append((total // 2, total - total // 2))
    elif conv.padding == "valid":
        pairs = [(0, 0)] * dims
    else:
        pairs = [(p, p) for p in conv.padding]
    assert len(pairs) == dims
    pads = [v for pair in reversed(pairs) for v in pair]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(x, pads, mode=mode)


def conv_per_location_reference(
    conv: nn.Module, model: nn.Module, x: Tensor, y: Tensor
) -> tuple[Tensor, Tensor, Tensor, int]:
    """``A``, ``G``, ``dW`` per group (and ``T``) by loops over samples (each alone), groups, output
    locations and kernel taps: ``a`` = the padded input patch at location ``t`` (channel-major,
    taps row-major, as ``weight.view(out, -1)``; ``+1`` with a bias), ``g = ∂l_n/∂s[:, t]``;
    ``A = Σ a aᵀ/(N·T)``, ``G = Σ g gᵀ/N``, ``dW = Σ g aᵀ/N``."""
    recorder = Recorder(conv=conv)
    samples = recorder.per_sample(
        len(x), lambda n: F.cross_entropy(model(x[n : n + 1]), y[n : n + 1])
    )["conv"]
    groups, bias = conv.groups, conv.bias is not None
    cin, cout = conv.in_channels // groups, conv.out_channels // groups
    A = G = W = None
    locations = 0
    for n, ((_, g_out),) in enumerate(samples):
        padded = explicit_padding(conv, x[n : n + 1])[0]
        out_shape = g_out.shape[2:]
        locations = math.prod(out_shape)
        weight = conv.weight.detach()
        with torch.no_grad():
            conv_out = conv(x[n : n + 1])[0]
        for group, where in itertools.product(
            range(groups), itertools.product(*map(range, out_shape))
        ):
            channels = slice(group * cin, (group + 1) * cin)
            outs = slice(group * cout, (group + 1) * cout)
            taps = []
            for offset in itertools.product(*map(range, conv.kernel_size)):
                geometry = zip(where, conv.stride, offset, conv.dilation, strict=True)
                taps.append(padded[(channels, *(w * s + o * d for w, s, o, d in geometry))])
            patch = torch.stack(taps, dim=1).reshape(-1)
            # the patch is what the convolution multiplies at this location
            expected_out = weight[outs].reshape(cout, -1) @ patch
            if bias:
                expected_out = expected_out + conv.bias.detach()[outs]
            assert_close(conv_out[(outs, *where)], expected_out, rtol=1e-10, atol=1e-12)
            a = torch.cat([patch, torch.ones(1)]) if bias else patch
            g = g_out[(0, outs, *where)]
            if A is None:
                A = torch.zeros(groups, a.numel(), a.numel())
                G = torch.zeros(groups, cout, cout)
                W = torch.zeros(groups, cout, a.numel())
            A[group] += torch.outer(a, a)
            G[group] += torch.outer(g, g)
            W[group] += torch.outer(g, a)
    count = len(x)
    return A / (count * locations), G / count, W / count, locations


def conv_matrix(conv: nn.Module) -> Tensor:
    """``[W b]`` of ``.grad`` per group, ``[groups, out/groups, in/groups·Πk (+1)]``."""
    weight = conv.weight.grad.reshape(conv.groups, conv.out_channels // conv.groups, -1)
    if conv.bias is None:
        return weight
    return torch.cat([weight, conv.bias.grad.reshape(conv.groups, -1, 1)], dim=-1)


# -- models nobody here wrote ---------------------------------------------------------------------
class Conv1D(nn.Module):
    """HF GPT-2's ``Conv1D``: weight ``(nx, nf)``, ``torch.addmm(bias, x.view(-1, nx), weight)``
    (HF initialises ``weight_std=0.02, bias_std=0``: a zero bias)."""

    def __init__(self, nf: int, nx: int, *, weight_std: float = 0.5, bias_std: float = 0.1) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(weight_std * torch.randn(nx, nf))
        bias = bias_std * torch.randn(nf) if bias_std else torch.zeros(nf)
        self.bias = nn.Parameter(bias)

    def forward(self, x: Tensor) -> Tensor:
        size_out = (*x.size()[:-1], self.nf)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)
