"""Mixture-of-experts uses (``kinds/experts.py``) against a twin of separate ``nn.Linear``
experts applied to the rows routed to them (weights copied).

A stacked weight ``W`` ``[E, d_out, d_in]`` used as HF transformers 5 uses it — one expert at a time
(``F.linear(x, W[e])``, ``experts_implementation="eager"``), all experts in one grouped matmul with
offsets (``F.grouped_mm``, the default; float32 only on the CPU), or a batched matmul over
``[E, C, d_in]`` — is one use with a Kronecker block per expert. Wherever every expert is routed
rows, its factors and step must be those of its ``nn.Linear`` twin (docs/design.md,
"Mixture-of-experts").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_kfac import KFACPreconditioner
from tests.helpers import assert_close
from tests.references import assert_differs

E, D_IN, D_OUT, N, T, CLASSES = 3, 4, 8, 4, 5, 3


def routing(x: Tensor) -> Tensor:
    """A fixed token -> expert assignment (every expert gets tokens): by the sign pattern."""
    tokens = x.reshape(-1, x.shape[-1])
    return ((tokens[:, 0] > 0).long() + (tokens[:, 1] > 0).long()) % E


class StackedExperts(nn.Module):
    """``W`` ``[E, d_out, d_in]`` (``layout="out_in"``, transformers' default) or ``[E, d_in,
    d_out]`` (``"in_out"``), used by ``form`` = ``"eager"``, ``"grouped"`` or ``"batched"``."""

    def __init__(self, form: str, layout: str = "out_in") -> None:
        super().__init__()
        self.form, self.layout = form, layout
        shape = (E, D_OUT, D_IN) if layout == "out_in" else (E, D_IN, D_OUT)
        self.weight = nn.Parameter(0.5 * torch.randn(shape))
        self.head = nn.Linear(D_OUT, CLASSES)

    def matrix(self, e: int) -> Tensor:
        """``L_e`` ``[d_out, d_in]``."""
        return self.weight[e] if self.layout == "out_in" else self.weight[e].T

    def experts(self, tokens: Tensor, experts: Tensor) -> Tensor:
        out = tokens.new_zeros(tokens.shape[0], D_OUT)
        if self.form == "eager":
            for e in range(E):
                rows = torch.where(experts == e)[0]
                weight = self.weight[e] if self.layout == "out_in" else None
                if weight is None:
                    raise ValueError("eager experts store [E, d_out, d_in]")
                out = out.index_put((rows,), F.linear(tokens[rows], weight))
            return out
        order = torch.argsort(experts, stable=True)
        if self.form == "grouped":
            offsets = torch.cumsum(torch.bincount(experts, minlength=E), 0).to(torch.int32)
            mat_b = self.weight.transpose(-2, -1) if self.layout == "out_in" else self.weight
            sorted_out = F.grouped_mm(tokens[order], mat_b, offs=offsets)
            return out.index_put((order,), sorted_out)
        # batched: [E, C, d_in] with C = the largest group, padded with zero rows
        counts = torch.bincount(experts, minlength=E).tolist()
        capacity = max(counts)
        padded = tokens.new_zeros(E, capacity, D_IN)
        for e in range(E):
            rows = torch.where(experts == e)[0]
            padded[e, : len(rows)] = tokens[rows]
        mat_b = self.weight.transpose(-2, -1) if self.layout == "out_in" else self.weight
        result = torch.bmm(padded, mat_b)
        for e in range(E):
            rows = torch.where(experts == e)[0]
            out = out.index_put((rows,), result[e, : len(rows)])
        return out

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.reshape(-1, D_IN)
        hidden = torch.tanh(self.experts(tokens, routing(x)))
        return self.head(hidden.reshape(*x.shape[:-1], D_OUT)).mean(1)


class LinearExperts(nn.Module):
    """The twin: ``E`` separate ``nn.Linear`` experts, each applied to its routed rows — padded
    with zero rows to the largest group for the batched form, whose zero rows are rows of its
    call (as any padding without a mask)."""

    def __init__(self, stacked: StackedExperts) -> None:
        super().__init__()
        self.padded = stacked.form == "batched"
        self.experts = nn.ModuleList(nn.Linear(D_IN, D_OUT, bias=False) for _ in range(E))
        with torch.no_grad():
            for e, expert in enumerate(self.experts):
                expert.weight.copy_(stacked.matrix(e))
        self.head = nn.Linear(D_OUT, CLASSES)
        self.head.load_state_dict(stacked.head.state_dict())

    def forward(self, x: Tensor) -> Tensor:
        tokens, experts = x.reshape(-1, D_IN), routing(x)
        out = tokens.new_zeros(tokens.shape[0], D_OUT)
        capacity = int(torch.bincount(experts, minlength=E).max())
        for e, expert in enumerate(self.experts):
            rows = torch.where(experts == e)[0]
            inputs = tokens[rows]
            if self.padded:
                padding = inputs.new_zeros(capacity - len(rows), D_IN)
                inputs = torch.cat([inputs, padding])
            out = out.index_put((rows,), expert(inputs)[: len(rows)])
        return self.head(torch.tanh(out).reshape(*x.shape[:-1], D_OUT)).mean(1)


def data(step: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(step)
    return torch.randn(N, T, D_IN, generator=gen, dtype=dtype), torch.randint(
        0, CLASSES, (N,), generator=gen
    )


def train(model: nn.Module, dtype: torch.dtype, steps: int = 2) -> KFACPreconditioner:
    pre = KFACPreconditioner(model, damping=1e-2, kl_clip=None, inverse_update_interval=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for step in range(steps):
        x, y = data(step, dtype)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        opt.step()
    return pre


CASES = [("eager", "out_in", torch.float64), ("batched", "out_in", torch.float64)]
CASES += [("batched", "in_out", torch.float64), ("grouped", "out_in", torch.float32)]
CASES += [("grouped", "in_out", torch.float32)]


@pytest.mark.parametrize(("form", "layout", "dtype"), CASES)
def test_stacked_experts_equal_separate_linear_experts(form: str, layout: str, dtype) -> None:
    torch.manual_seed(0)
    stacked = StackedExperts(form, layout).to(dtype)
    twin = LinearExperts(stacked).to(dtype)
    x, _ = data(0, dtype)
    assert torch.bincount(routing(x), minlength=E).min() > 0  # every expert is routed rows
    pre, pre_twin = train(stacked, dtype), train(twin, dtype)
    assert pre.preconditioned_fraction == pre_twin.preconditioned_fraction == 1.0
    block = pre.block("weight")
    assert block.spec.kind == "experts" and block.a.value.shape[0] == E
    rtol, atol = (1e-9, 1e-12) if dtype == torch.float64 else (2e-5, 1e-6)
    for e, expert in enumerate(twin.experts):
        mine = stacked.matrix(e).detach()
        assert_close(mine, expert.weight.detach(), rtol=rtol, atol=atol)
        twin_block = pre_twin.block(expert.weight)
        assert_close(block.a.value[e], twin_block.a.value[0], rtol=rtol, atol=atol)
        assert_close(block.g.value[e], twin_block.g.value[0], rtol=rtol, atol=atol)
    # the K-FAC steps moved the experts away from plain SGD's
    torch.manual_seed(0)
    sgd = StackedExperts(form, layout).to(dtype)
    opt = torch.optim.SGD(sgd.parameters(), lr=0.3)
    for step in range(2):
        x, y = data(step, dtype)
        opt.zero_grad()
        F.cross_entropy(sgd(x), y).backward()
        opt.step()
    assert_differs(stacked.weight, sgd.weight)


def test_an_expert_routed_no_rows_keeps_its_input_factor() -> None:
    """``A_e`` is normalised by the rows routed to ``e``: an expert routed none in a step keeps
    its ``A`` (no batch estimate exists), while ``G_e = (1/N) Σ g gᵀ`` over its (zero) rows is the
    batch's estimate: the others move, its ``A`` does not."""
    torch.manual_seed(0)
    model = StackedExperts("eager").double()
    pre = KFACPreconditioner(model, kl_clip=None, factor_decay=0.5)
    x, y = data(0, torch.float64)
    F.cross_entropy(model(x), y).backward()
    pre.step()
    block = pre.block("weight")
    before = block.a.value.clone()
    x = x.abs()  # every token to expert (1 + 1) % 3 = 2
    assert set(routing(x).tolist()) == {2}
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    pre.step()
    assert torch.equal(block.a.value[:2], before[:2])
    assert not torch.equal(block.a.value[2], before[2])
    assert bool(block.seen().all())


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_transformers_experts_implementations_give_the_same_kfac_step(name: str) -> None:
    """HF MoE from a small config, ``experts_implementation="eager"`` (one ``F.linear`` per
    expert) and ``"grouped_mm"`` (one grouped matmul with offsets): the same use, the same
    per-expert factors and the same step (float32: the grouped matmul's own precision)."""
    from tests.hf_models import causal_lm

    steps = {}
    for implementation in ("eager", "grouped_mm"):
        model = causal_lm(name, 20, 8, implementation)
        tokens = torch.randint(0, 20, (4, 6), generator=torch.Generator().manual_seed(0))
        pre = KFACPreconditioner(model, kl_clip=None, damping=1e-2)
        logits = model(tokens)
        F.cross_entropy(logits.reshape(-1, 20), tokens.reshape(-1)).backward()
        pre.step()
        assert pre.preconditioned_fraction == 1.0
        steps[implementation] = (
            {n: p.grad.clone() for n, p in model.named_parameters()},
            {n: [f.value for f in b.factors] for n, b in pre.blocks.items() if ".experts." in n},
        )
    (eager_grads, eager_factors), (grouped_grads, grouped_factors) = steps.values()
    assert eager_factors.keys() == grouped_factors.keys() and len(eager_factors) == 4
    for block, factors in eager_factors.items():
        for mine, theirs in zip(factors, grouped_factors[block], strict=True):
            assert_close(theirs, mine, rtol=1e-4, atol=1e-6)
    for parameter, grad in eager_grads.items():
        assert_close(grouped_grads[parameter], grad, rtol=1e-3, atol=1e-5)
