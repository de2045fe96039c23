"""Curvature blocks of the traced uses against explicit dense float64 math (issue 8).

Every reference here is computed without the library: per-sample loops that run each sample alone
and differentiate its loss with ``torch.autograd.grad`` (``g_n = ∂l_n/∂s``, docs/design.md §2),
explicit one-hot matrices, explicit patch loops, ``torch.kron`` and ``torch.linalg.solve``. Each
formula reference also reproduces autograd's gradient of the whole batch
(``dW = (1/N) Σ g aᵀ``), which checks the reference itself; each test also checks that a
deliberately wrong reference (another convention, a missing step) would differ, so that it can
fail.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_kfac import KFACPreconditioner
from tests.helpers import assert_close, dense_damped_kron_solve
from tests.references import (
    DAMPING,
    FACTOR_ATOL,
    FACTOR_RTOL,
    STEP_ATOL,
    STEP_RTOL,
    Recorder,
    assert_differs,
    conv_matrix,
    conv_per_location_reference,
    expand_reference,
    linear_matrix,
    linear_rows,
    train_step,
)

pytestmark = pytest.mark.usefixtures("float64")


# -- 1. embedding ----------------------------------------------------------------------------------
class EmbeddingNet(nn.Module):
    def __init__(self, padding_idx: int | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(7, 3, padding_idx=padding_idx)
        self.head = nn.Linear(3 * 4, 2)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(ids)).flatten(1))


# Tokens 3 and 6 never occur; token 2 occurs (the padding token of the padding case).
IDS = torch.tensor(
    [[0, 1, 2, 2], [4, 4, 5, 0], [1, 2, 5, 5], [0, 0, 4, 1], [5, 2, 1, 4]], dtype=torch.long
)
LABELS = torch.tensor([0, 1, 1, 0, 1])


def embedding_reference(model: EmbeddingNet) -> tuple[Tensor, Tensor, Tensor]:
    """One-hot reference: ``s = Lx`` with ``L = Wᵀ`` ``[E, V]`` and ``x = onehot(id)``, except that
    a padding position's weight gradient is blocked, i.e. its input acts as ``x = 0``."""
    reference = copy.deepcopy(model)
    recorder = Recorder(emb=reference.emb)
    samples = recorder.per_sample(
        len(IDS), lambda n: F.cross_entropy(reference(IDS[n : n + 1]), LABELS[n : n + 1])
    )["emb"]
    pad = model.emb.padding_idx
    rows = []
    for calls in samples:
        ((ids, g),) = calls
        onehot = F.one_hot(ids.reshape(-1), 7).to(torch.float64)
        if pad is not None:
            onehot[ids.reshape(-1) == pad] = 0.0
        rows.append((onehot, g.reshape(-1, 3)))
    return expand_reference(rows)


@pytest.mark.parametrize("padding_idx", [None, 2], ids=["no_padding", "padding_idx"])
def test_embedding_factors_and_step_equal_dense_one_hot_solve(padding_idx: int | None) -> None:
    """``A = diag(Σ onehot onehotᵀ)/(N·T)`` (padding positions count as ``x = 0``),
    ``G = (1/N) Σ_{n,t} g gᵀ`` from per-sample output gradients, ``dL = W.gradᵀ``, and the step
    ``unvec((A ⊗ G + λI)^-1 vec(dL))`` on the dense one-hot ``A``; absent tokens (and the
    padding token) get a zero step."""
    model = EmbeddingNet(padding_idx)
    A, G, dL = embedding_reference(model)
    # the reference is consistent with autograd (dW = (1/N) Σ g aᵀ)
    raw = copy.deepcopy(model)
    F.cross_entropy(raw(IDS), LABELS).backward()
    assert_close(raw.emb.weight.grad.T, dL, rtol=1e-10, atol=1e-13)
    assert torch.count_nonzero(A - torch.diag(torch.diagonal(A))) == 0  # one-hot rows: diagonal

    pre = train_step(model, lambda m: F.cross_entropy(m(IDS), LABELS))
    block = pre.block("emb.weight")
    assert block.a.value.shape == (1, 7) and block.g.value.shape == (1, 3, 3)
    assert_close(block.a.value[0], torch.diagonal(A), rtol=FACTOR_RTOL, atol=FACTOR_ATOL)
    assert_close(block.g.value[0], G, rtol=FACTOR_RTOL, atol=FACTOR_ATOL)
    step = model.emb.weight.grad.T  # [E, V]
    expected = dense_damped_kron_solve(A, G, dL, DAMPING)
    assert_close(step, expected, rtol=STEP_RTOL, atol=STEP_ATOL)
    absent = [3, 6] + ([padding_idx] if padding_idx is not None else [])
    assert torch.count_nonzero(step[:, absent]) == 0
    assert bool(torch.isfinite(step).all())
    # could fail: counting the tokens over N instead of N·T gives another step
    assert_differs(step, dense_damped_kron_solve(A * 4, G, dL, DAMPING))


def test_embedding_padding_tokens_do_not_change_the_inverse_method_step() -> None:
    """Factored Tikhonov (``compute_method='inverse'``):
    ``P = (G + √λ/π I)^-1 dL (A + π√λ I)^-1`` with ``π² = (tr A / V) / (tr G / E)``, on the
    one-hot ``A`` whose padding entry is 0 (a padding position's weight gets no gradient, so it
    is an input ``x = 0``); the count of padding tokens must not move the steps of other tokens."""
    model = EmbeddingNet(padding_idx=2)
    A, G, dL = embedding_reference(model)
    pre = train_step(model, lambda m: F.cross_entropy(m(IDS), LABELS), compute_method="inverse")
    assert pre.block("emb.weight").a.value is not None
    root = DAMPING**0.5
    pi = torch.sqrt((torch.trace(A) / 7) / (torch.trace(G) / 3))
    expected = (
        torch.linalg.inv(G + root / pi * torch.eye(3))
        @ dL
        @ torch.linalg.inv(A + pi * root * torch.eye(7))
    )
    step = model.emb.weight.grad.T
    assert_close(step, expected, rtol=STEP_RTOL, atol=STEP_ATOL)
    # could fail: with the padding positions counted in A (x = onehot(pad)) the step differs
    counted = torch.diag(torch.bincount(IDS.reshape(-1), minlength=7).double() / IDS.numel())
    pi_counted = torch.sqrt((torch.trace(counted) / 7) / (torch.trace(G) / 3))
    wrong = (
        torch.linalg.inv(G + root / pi_counted * torch.eye(3))
        @ dL
        @ torch.linalg.inv(counted + pi_counted * root * torch.eye(7))
    )
    assert_differs(step, wrong)


# -- 2. normalisation layers: unit-wise Fisher ----------------------------------------------
def unit_wise_solve(F_c: Tensor, grad: Tensor) -> Tensor:
    """``(F_c + λI)^-1 dθ_c`` per channel: ``F_c`` ``[C, k, k]``, ``grad`` ``[C, k]``."""
    eye = torch.eye(F_c.shape[-1]).expand_as(F_c)
    return torch.linalg.solve(F_c + DAMPING * eye, grad.unsqueeze(-1))[..., 0]


def norm_params(norm: nn.Module) -> list[nn.Parameter]:
    return [p for p in (norm.weight, getattr(norm, "bias", None)) if p is not None]


def norm_grads(norm: nn.Module) -> Tensor:
    """``[C, k]``: ``(γ.grad, β.grad)`` of the trained ones, per channel."""
    return torch.stack([p.grad.reshape(-1) for p in norm_params(norm) if p.requires_grad], -1)


NORM_CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "layer_norm_sequence": (lambda: nn.LayerNorm(4), (3, 4)),
    "layer_norm_no_bias": (lambda: nn.LayerNorm(4, bias=False), (3, 4)),
    "layer_norm_two_dims": (lambda: nn.LayerNorm((3, 4)), (3, 4)),
    "group_norm": (lambda: nn.GroupNorm(2, 4), (4, 3)),
    "group_norm_2d": (lambda: nn.GroupNorm(2, 4), (4, 2, 3)),
}
if hasattr(nn, "RMSNorm"):
    NORM_CASES["rms_norm"] = (lambda: nn.RMSNorm(4), (3, 4))


def norm_model(make: Callable[[], nn.Module], shape: tuple[int, ...]) -> nn.Sequential:
    torch.manual_seed(0)
    norm = make()
    with torch.no_grad():  # non-trivial affine parameters
        for p in norm_params(norm):
            p.add_(0.3 * torch.randn_like(p))
    return nn.Sequential(norm, nn.Tanh(), nn.Flatten(), nn.Linear(math.prod(shape), 3))


@pytest.mark.parametrize("case", sorted(NORM_CASES))
def test_per_sample_norm_unit_wise_fisher_and_step_equal_dense(case: str) -> None:
    """LayerNorm / GroupNorm / RMSNorm (per-sample statistics, so each sample alone is exact):
    ``u_{n,c}`` = the gradient of ``l_n`` w.r.t. ``(γ_c, β_c)`` by autograd on sample ``n``
    alone, ``F_c = (1/N) Σ_n u uᵀ`` ``[C, k, k]``, step ``(F_c + λI)^-1 dθ_c``."""
    make, shape = NORM_CASES[case]
    model = norm_model(make, shape)
    gen = torch.Generator().manual_seed(1)
    x = 1.5 * torch.randn(6, *shape, generator=gen) + 0.5
    y = torch.randint(0, 3, (6,), generator=gen)
    reference = copy.deepcopy(model)
    params = norm_params(reference[0])
    u = []
    for n in range(len(x)):
        loss = F.cross_entropy(reference(x[n : n + 1]), y[n : n + 1])
        u.append(torch.stack([g.reshape(-1) for g in torch.autograd.grad(loss, params)], -1))
    u = torch.stack(u, 1)  # [C, N, k]
    F_ref = u.mT @ u / len(x)
    grad = u.mean(1)
    F.cross_entropy(reference(x), y).backward()
    assert_close(norm_grads(reference[0]), grad, rtol=1e-10, atol=1e-13)

    pre = train_step(model, lambda m: F.cross_entropy(m(x), y))
    block = pre.block("0.weight")
    assert block.unit_wise
    assert_close(block.g.value, F_ref, rtol=FACTOR_RTOL, atol=FACTOR_ATOL)
    step = norm_grads(model[0])
    assert_close(step, unit_wise_solve(F_ref, grad), rtol=STEP_RTOL, atol=STEP_ATOL)
    # could fail: the Fisher of the mean gradient (not of per-sample gradients) is another one
    wrong = grad.unsqueeze(-1) @ grad.unsqueeze(-2)
    assert_differs(step, unit_wise_solve(wrong, grad))


BATCH_NORM_CASES = {
    "bn1d_features": (lambda: nn.BatchNorm1d(4), (4,)),
    "bn1d_sequence": (lambda: nn.BatchNorm1d(4), (4, 3)),
    "bn2d": (lambda: nn.BatchNorm2d(3), (3, 2, 3)),
    "bn2d_frozen_beta": (lambda: nn.BatchNorm2d(3), (3, 2, 2)),
}


@pytest.mark.parametrize("case", sorted(BATCH_NORM_CASES))
def test_batch_norm_training_unit_wise_fisher_and_step_equal_dense(case: str) -> None:
    """BatchNorm in training mode. Batch statistics couple the samples, so running a sample alone
    is *not* its per-sample gradient; the reference is SP-NGD's per-sample formula with ``x̂``
    from the batch statistics taken as given: ``x̂ = (x − mean_{n,p} x)/sqrt(var_{n,p} x + ε)``
    (biased variance), ``g = N·∂L/∂y`` from the full batch, ``u_{n,c} = (Σ_p g x̂, Σ_p g)``,
    ``F_c = (1/N) Σ_n u uᵀ``, step ``(F_c + λI)^-1 dθ_c``; ``(1/N) Σ_n u`` is checked against
    autograd's ``(γ.grad, β.grad)``."""
    make, shape = BATCH_NORM_CASES[case]
    model = norm_model(make, shape)
    if case.endswith("frozen_beta"):
        model[0].bias.requires_grad_(False)
    gen = torch.Generator().manual_seed(2)
    count = 6
    x = 2.0 * torch.randn(count, *shape, generator=gen) + 1.0
    y = torch.randint(0, 3, (count,), generator=gen)

    reference = copy.deepcopy(model)
    kept = {}
    handle = reference[0].register_forward_hook(
        lambda module, args, output: kept.update(y=output) or output.retain_grad()
    )
    F.cross_entropy(reference(x), y).backward()
    handle.remove()
    dims = (0, *range(2, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    x_hat = (x - mean) / torch.sqrt(var + reference[0].eps)
    g = count * kept["y"].grad
    parts = [(g * x_hat).reshape(count, shape[0], -1).sum(-1)]  # Σ_p g x̂ per (n, c)
    if reference[0].bias.requires_grad:
        parts.append(g.reshape(count, shape[0], -1).sum(-1))  # Σ_p g
    u = torch.stack(parts, -1).transpose(0, 1)  # [C, N, k]
    F_ref = u.mT @ u / count
    grad = u.mean(1)
    assert_close(norm_grads(reference[0]), grad, rtol=1e-10, atol=1e-13)

    pre = train_step(model, lambda m: F.cross_entropy(m(x), y))
    block = pre.block("0.weight")
    assert block.unit_wise and block.g.value.shape == (shape[0], len(parts), len(parts))
    assert_close(block.g.value, F_ref, rtol=FACTOR_RTOL, atol=FACTOR_ATOL)
    step = norm_grads(model[0])
    assert_close(step, unit_wise_solve(F_ref, grad), rtol=STEP_RTOL, atol=STEP_ATOL)
    # could fail: x̂ from the running statistics (eval-mode normalisation) gives another Fisher
    x_running = (x - 0.0) / torch.sqrt(torch.ones_like(var) + reference[0].eps)
    wrong_u = torch.stack(
        [(g * x_running).reshape(count, shape[0], -1).sum(-1), *parts[1:]], -1
    ).transpose(0, 1)
    assert_differs(block.g.value, wrong_u.mT @ wrong_u / count)


# -- 6. huge sides: diagonal factors ---------------------------------------------------------
def test_sides_above_max_factor_dim_are_the_diagonal_of_the_dense_factor() -> None:
    """With ``max_factor_dim = 5``: ``Linear(3, 6)`` keeps ``A`` (side 4) dense and ``G`` (side
    6) as ``diag(G)``; ``Linear(6, 2)`` keeps ``A`` (side 7) as ``diag(A)`` and ``G`` dense; each
    step is ``unvec((A' ⊗ G' + λI)^-1 vec(dW))`` with the diagonal side replaced by ``diag``;
    the coverage report names the diagonal side."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(7, 3, generator=gen), torch.randint(0, 2, (7,), generator=gen)
    reference = copy.deepcopy(model)
    recorder = Recorder(first=reference[0], second=reference[2])
    calls = recorder.per_sample(
        len(x), lambda n: F.cross_entropy(reference(x[n : n + 1]), y[n : n + 1])
    )
    refs = {
        name: expand_reference([linear_rows(c, bias=True) for c in per_sample])
        for name, per_sample in calls.items()
    }
    F.cross_entropy(reference(x), y).backward()
    assert_close(linear_matrix(reference[0]), refs["first"][2], rtol=1e-10, atol=1e-13)
    assert_close(linear_matrix(reference[2]), refs["second"][2], rtol=1e-10, atol=1e-13)
    pre = train_step(model, lambda m: F.cross_entropy(m(x), y), max_factor_dim=5)

    A, G, dW = refs["first"]
    block = pre.block("0.weight")
    assert not block.a.diagonal and block.g.diagonal and block.g.value.shape == (1, 6)
    assert_close(block.a.value[0], A, rtol=FACTOR_RTOL, atol=FACTOR_ATOL)
    assert_close(block.g.value[0], torch.diagonal(G), rtol=FACTOR_RTOL, atol=FACTOR_ATOL)
    step = linear_matrix(model[0])
    assert_close(
        step,
        dense_damped_kron_solve(A, torch.diag(torch.diagonal(G)), dW, DAMPING),
        rtol=STEP_RTOL,
        atol=STEP_ATOL,
    )
    assert_differs(step, dense_damped_kron_solve(A, G, dW, DAMPING))  # dense G differs

    A, G, dW = refs["second"]
    block = pre.block("2.weight")
    assert block.a.diagonal and not block.g.diagonal and block.a.value.shape == (1, 7)
    assert_close(block.a.value[0], torch.diagonal(A), rtol=FACTOR_RTOL, atol=FACTOR_ATOL)
    assert_close(block.g.value[0], G, rtol=FACTOR_RTOL, atol=FACTOR_ATOL)
    step = linear_matrix(model[2])
    assert_close(
        step,
        dense_damped_kron_solve(torch.diag(torch.diagonal(A)), G, dW, DAMPING),
        rtol=STEP_RTOL,
        atol=STEP_ATOL,
    )
    assert_differs(step, dense_damped_kron_solve(A, G, dW, DAMPING))

    report = pre.coverage_report()
    line = {r.name: r for r in pre.structure.reports}
    assert "G diagonal (side > max_factor_dim)" in line["0.weight"].detail
    assert "A diagonal (side > max_factor_dim)" in line["2.weight"].detail
    assert "G diagonal" in report and "A diagonal" in report


# -- 7. Conv1d and Conv3d: per-location patch loop ---------------------------------------------
CONV_CASES = {
    "conv1d_plain": (nn.Conv1d, dict(in_channels=2, out_channels=3, kernel_size=3), (2, 7)),
    "conv1d_stride_padding_dilation": (
        nn.Conv1d,
        dict(in_channels=2, out_channels=3, kernel_size=3, stride=2, padding=2, dilation=2),
        (2, 8),
    ),
    "conv1d_groups": (
        nn.Conv1d,
        dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=1),
        (4, 6),
    ),
    "conv1d_same_even_kernel": (
        nn.Conv1d,
        dict(in_channels=2, out_channels=3, kernel_size=4, padding="same", bias=False),
        (2, 6),
    ),
    "conv1d_reflect": (
        nn.Conv1d,
        dict(in_channels=2, out_channels=2, kernel_size=3, padding=1, padding_mode="reflect"),
        (2, 5),
    ),
    "conv3d_plain": (nn.Conv3d, dict(in_channels=2, out_channels=3, kernel_size=2), (2, 3, 3, 2)),
    "conv3d_groups_padding_stride": (
        nn.Conv3d,
        dict(
            in_channels=4,
            out_channels=4,
            kernel_size=(2, 1, 2),
            groups=2,
            padding=(1, 0, 1),
            stride=(2, 1, 1),
        ),
        (4, 3, 2, 2),
    ),
    "conv3d_no_bias_dilation": (
        nn.Conv3d,
        dict(in_channels=2, out_channels=2, kernel_size=2, dilation=(1, 2, 1), bias=False),
        (2, 3, 4, 2),
    ),
}


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv1d_conv3d_factors_and_step_equal_per_location_loop(case: str) -> None:
    """KFC for ``F.conv1d``/``F.conv3d`` (one Kronecker block per group): ``A``, ``G`` and the
    step ``unvec((A_g ⊗ G_g + λI)^-1 vec(dW_g))`` per group equal the per-location patch loop."""
    cls, kwargs, shape = CONV_CASES[case]
    torch.manual_seed(0)
    conv = cls(**kwargs)
    pool = nn.AdaptiveAvgPool1d(1) if cls is nn.Conv1d else nn.AdaptiveAvgPool3d(1)
    model = nn.Sequential(conv, nn.Tanh(), pool, nn.Flatten(), nn.Linear(conv.out_channels, 3))
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, *shape, generator=gen)
    y = torch.randint(0, 3, (4,), generator=gen)
    reference = copy.deepcopy(model)
    A, G, W, locations = conv_per_location_reference(reference[0], reference, x, y)
    F.cross_entropy(reference(x), y).backward()
    assert_close(conv_matrix(reference[0]), W, rtol=1e-10, atol=1e-13)

    pre = train_step(model, lambda m: F.cross_entropy(m(x), y))
    block = pre.block("0.weight")
    assert_close(block.a.value, A, rtol=FACTOR_RTOL, atol=FACTOR_ATOL)
    assert_close(block.g.value, G, rtol=FACTOR_RTOL, atol=FACTOR_ATOL)
    step = conv_matrix(conv)
    for group in range(conv.groups):
        expected = dense_damped_kron_solve(A[group], G[group], W[group], DAMPING)
        assert_close(step[group], expected, rtol=STEP_RTOL, atol=STEP_ATOL)
    # could fail: G averaged over locations too (A's normaliser N·T) gives another step
    assert locations > 1
    assert_differs(step[0], dense_damped_kron_solve(A[0], G[0] / locations, W[0], DAMPING))


# -- 8. activation checkpointing -------------------------------------------------------------
class CheckpointNet(nn.Module):
    def __init__(self, reentrant: bool | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.reentrant = reentrant
        self.inp = nn.Linear(4, 5)
        self.body = nn.Sequential(nn.Linear(5, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 5))
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        if self.reentrant is None:
            h = self.body(h)
        else:
            h = checkpoint(self.body, h, use_reentrant=self.reentrant)
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("approximation", ["expand", "reduce"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_activation_checkpointing_gives_the_factors_and_step_of_the_plain_model(
    reentrant: bool, approximation: str
) -> None:
    """``torch.utils.checkpoint`` (re-running the body's forward in backward) changes nothing:
    over two steps (discovery, then traced sites only) every block's factors and the
    preconditioned gradients equal the model without checkpointing, which the dense tests hold
    to ``A = Σ a aᵀ/(N·T)``, ``G = Σ g gᵀ/N``, unit-wise ``F_c``."""
    gen = torch.Generator().manual_seed(6)
    batches = [(torch.randn(6, 3, 4, generator=gen), torch.randint(0, 3, (6,), generator=gen))]
    batches.append((torch.randn(6, 3, 4, generator=gen), torch.randint(0, 3, (6,), generator=gen)))

    def loss_of(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model(x).mean(1), y)

    runs = []
    for mode in (None, reentrant):
        model = CheckpointNet(mode)
        pre = KFACPreconditioner(
            model, damping=DAMPING, kl_clip=None, approximation=approximation,
            factor_decay=0.5, inverse_update_interval=1,
        )  # fmt: skip
        steps = []
        for x, y in batches:
            model.zero_grad()
            loss_of(model, x, y).backward()
            pre.step()
            steps.append({n: p.grad.clone() for n, p in model.named_parameters()})
        runs.append((pre, steps))
    (plain, plain_steps), (ckpt, ckpt_steps) = runs
    assert sorted(ckpt.blocks) == sorted(plain.blocks)
    assert "body.1.weight" in ckpt.blocks and "body.0.weight" in ckpt.blocks
    for name, block in plain.blocks.items():
        for mine, ref in zip(ckpt.blocks[name].factors, block.factors, strict=True):
            assert_close(mine.value, ref.value, rtol=1e-12, atol=1e-14)
    for mine, ref in zip(ckpt_steps, plain_steps, strict=True):
        for name in ref:
            assert_close(mine[name], ref[name], rtol=1e-9, atol=1e-12)
    # could fail: the steps of the two batches differ
    assert_differs(plain_steps[1]["body.0.weight"], plain_steps[0]["body.0.weight"])


# -- 9. keyword calls --------------------------------------------------------------------------
class KeywordNet(nn.Module):
    def __init__(self, keywords: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.keywords = keywords
        self.fc = nn.Linear(4, 5)
        self.w2 = nn.Parameter(0.5 * torch.randn(3, 5))
        self.b2 = nn.Parameter(0.1 * torch.randn(3))

    def forward(self, x: Tensor) -> Tensor:
        if self.keywords:
            h = torch.tanh(self.fc(input=x))
            return F.linear(input=h, weight=self.w2, bias=self.b2)
        return F.linear(torch.tanh(self.fc(x)), self.w2, self.b2)


def test_keyword_calls_are_traced_like_positional_ones() -> None:
    """``layer(input=x)``, ``F.linear(input=, weight=, bias=)`` and ``model(x=...)``: the module's
    factors equal the dense ``A = Σ a aᵀ/N``, ``G = Σ g gᵀ/N`` and its step the dense solve; the
    functional use has the factors and step of the positional twin."""
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(6, 4, generator=gen), torch.randint(0, 3, (6,), generator=gen)
    keyword, positional = KeywordNet(True), KeywordNet(False)
    reference = copy.deepcopy(keyword)
    recorder = Recorder(fc=reference.fc)
    calls = recorder.per_sample(
        len(x), lambda n: F.cross_entropy(reference(x=x[n : n + 1]), y[n : n + 1])
    )["fc"]
    A, G, dW = expand_reference([linear_rows(c, bias=True) for c in calls])
    F.cross_entropy(reference(x=x), y).backward()
    assert_close(linear_matrix(reference.fc), dW, rtol=1e-10, atol=1e-13)
    pre_kw = train_step(keyword, lambda m: F.cross_entropy(m(x=x), y))
    pre_pos = train_step(positional, lambda m: F.cross_entropy(m(x), y))
    assert sorted(pre_kw.blocks) == sorted(pre_pos.blocks) == ["fc.weight", "w2"]
    block = pre_kw.block("fc.weight")
    assert_close(block.a.value[0], A, rtol=FACTOR_RTOL, atol=FACTOR_ATOL)
    assert_close(block.g.value[0], G, rtol=FACTOR_RTOL, atol=FACTOR_ATOL)
    assert_close(
        linear_matrix(keyword.fc),
        dense_damped_kron_solve(A, G, dW, DAMPING),
        rtol=STEP_RTOL,
        atol=STEP_ATOL,
    )
    for name in ("fc.weight", "w2"):
        for mine, ref in zip(pre_kw.block(name).factors, pre_pos.block(name).factors, strict=True):
            assert_close(mine.value, ref.value, rtol=1e-12, atol=1e-14)
    for (_, p), (_, q) in zip(
        keyword.named_parameters(), positional.named_parameters(), strict=True
    ):
        assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13)
    assert_differs(linear_matrix(keyword.fc), dW)  # preconditioning changed the gradient
