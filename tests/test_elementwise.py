"""Elementwise uses (``kinds/elementwise.py``) against a dense per-sample computation, float64.

A parameter combined elementwise with the batch — a scale ``w * x`` (HF ``LlamaRMSNorm``), a
learned position table ``x + p`` with ``p`` ``[1, T, C]`` (ViT), a shift ``x - b``, a class token
concatenated after ``expand`` — gets the diagonal of the per-sample Fisher:
``F_c = (1/N) Σ_n (∂l_n/∂w_c)²`` from each sample's loss alone, and the step
``(F_c + λ)⁻¹ ∂loss/∂w_c`` (docs/design.md, "Elementwise parameters").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kfac import KFACPreconditioner
from tests.helpers import assert_close
from tests.references import assert_differs

pytestmark = pytest.mark.usefixtures("float64")

N, T, C, CLASSES = 5, 4, 3, 3
DAMPING = 1e-2


class Elementwise(nn.Module):
    """``form``: how the parameter ``w`` meets the batch ``x`` ``[N, T, C]``."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        shapes = {"scale": (C,), "rscale": (C,), "positions": (1, T, C), "shift": (C,)}
        shapes |= {"rshift": (T, C), "token": (1, 1, C), "torch_mul": (T, 1)}
        self.w = nn.Parameter(1.0 + 0.3 * torch.randn(shapes[form]))
        self.head = nn.Linear(C, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        w, form = self.w, self.form
        if form == "scale":
            h = w * x
        elif form == "rscale":
            h = x * w
        elif form == "positions":
            h = x + w
        elif form == "shift":
            h = x - w
        elif form == "rshift":
            h = w - x
        elif form == "torch_mul":
            h = torch.mul(x, w)
        else:  # a class token in front of the sequence
            h = torch.cat((w.expand(x.shape[0], -1, -1), x), dim=1)
        return self.head(torch.tanh(h)).mean(1)


FORMS = ["scale", "rscale", "positions", "shift", "rshift", "torch_mul", "token"]


def data() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(N, T, C, generator=gen), torch.randint(0, CLASSES, (N,), generator=gen)


@pytest.mark.parametrize("form", FORMS)
def test_elementwise_fisher_and_step_equal_per_sample_dense(form: str) -> None:
    torch.manual_seed(0)
    model = Elementwise(form)
    x, y = data()
    per_sample = []
    for n in range(N):  # ∂l_n/∂w, each sample alone
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x[n : n + 1]), y[n : n + 1]), model.w)
        per_sample.append(grad.reshape(-1))
    u = torch.stack(per_sample)
    fisher = (u * u).mean(0)
    pre = KFACPreconditioner(model, damping=DAMPING, kl_clip=None)
    F.cross_entropy(model(x), y).backward()
    raw = model.w.grad.clone()
    assert_close(raw.reshape(-1), u.mean(0), rtol=1e-10, atol=1e-13)  # the reference holds
    pre.step()
    assert pre.preconditioned_fraction == 1.0
    block = pre.block("w")
    assert block.spec.kind == "elementwise"
    assert_close(block.g.value.reshape(-1), fisher, rtol=1e-10, atol=1e-13)
    expected = raw.reshape(-1) / (fisher + DAMPING)
    assert_close(model.w.grad.reshape(-1), expected, rtol=1e-9, atol=1e-12)
    assert_differs(model.w.grad.reshape(-1), raw.reshape(-1) / (u.mean(0) ** 2 + DAMPING))


def test_two_parameters_in_one_product_are_named() -> None:
    class TwoParameters(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Parameter(torch.ones(C)), nn.Parameter(torch.ones(C))
            self.head = nn.Linear(C, CLASSES)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(x * (self.a * self.b)).mean(1)

    model = TwoParameters()
    pre = KFACPreconditioner(model, kl_clip=None)
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(UserWarning, match=r"a \(used by mul"):
        pre.step()


class ScaleShift(nn.Module):
    """A hand-written affine normalisation, ``w * x̂ + b`` (and ``b + x̂ * w``)."""

    def __init__(self, reflected: bool) -> None:
        super().__init__()
        self.reflected = reflected
        self.w = nn.Parameter(1.0 + 0.3 * torch.randn(C))
        self.b = nn.Parameter(0.1 * torch.randn(C))
        self.head = nn.Linear(C, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        x_hat = (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True)
        h = self.b + x_hat * self.w if self.reflected else self.w * x_hat + self.b
        return self.head(torch.tanh(h)).mean(1)


@pytest.mark.parametrize("reflected", [False, True])
def test_a_scale_and_shift_pair_gets_one_unit_wise_block_per_channel(reflected: bool) -> None:
    """``w * x̂ + b``: one 2×2 per-sample Fisher block per channel for ``(w_c, b_c)`` (as a
    normalisation layer's), ``F_c = (1/N) Σ_n u uᵀ``, ``u = (∂l_n/∂w_c, ∂l_n/∂b_c)``, on every
    step (the structure stays one use after it is fixed)."""
    torch.manual_seed(0)
    model = ScaleShift(reflected)
    x, y = data()
    per_sample = []
    for n in range(N):
        grads = torch.autograd.grad(
            F.cross_entropy(model(x[n : n + 1]), y[n : n + 1]), [model.w, model.b]
        )
        per_sample.append(torch.stack(grads, dim=-1))  # [C, 2]
    u = torch.stack(per_sample)  # [N, C, 2]
    fisher = torch.einsum("nci,ncj->cij", u, u) / N
    pre = KFACPreconditioner(model, damping=DAMPING, kl_clip=None)
    for _ in range(2):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        raw = torch.stack([model.w.grad, model.b.grad], dim=-1).clone()
        pre.step()
    assert pre.preconditioned_fraction == 1.0
    block = pre.block("w")
    assert block.spec.detail == ("affine",) and block.spec.bias.name == "b"
    assert len(pre.blocks) == 2  # the pair and the head
    assert_close(block.g.value, fisher, rtol=1e-10, atol=1e-13)
    solve = torch.linalg.solve(fisher + DAMPING * torch.eye(2), raw.unsqueeze(-1))[..., 0]
    assert_close(torch.stack([model.w.grad, model.b.grad], dim=-1), solve, rtol=1e-9, atol=1e-12)
