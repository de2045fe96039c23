"""Weight sharing, tied parameters and twins against dense float64 math (issue 8).

- A layer called ``T`` times in one forward is one use with ``T`` positions: it must equal one
  call on the concatenated ``(N, T, d)`` input (expand and reduce, docs/design.md §2).
- One parameter used by different sites (tied embedding / LM head, two ``nn.Linear`` sharing a
  weight) keeps per-use factors; its step is the sum over uses of each use's dense Kronecker solve
  — what the untied twin (two parameters) gets, summed.
- ``nn.MultiheadAttention`` and GPT-2's ``Conv1D`` (``torch.addmm``) equal the same function
  written with ``nn.Linear`` modules.

References are computed as in ``test_blocks_dense`` (per-sample loops, ``torch.kron``).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.helpers import assert_close, dense_damped_kron_solve
from tests.references import (
    DAMPING,
    FACTOR_ATOL,
    FACTOR_RTOL,
    STEP_ATOL,
    STEP_RTOL,
    Conv1D,
    Recorder,
    assert_differs,
    expand_reference,
    linear_matrix,
    linear_rows,
    reduce_reference,
    train_step,
)

pytestmark = pytest.mark.usefixtures("float64")


def data(n: int, *shape: int, classes: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen), torch.randint(0, classes, (n,), generator=gen)


REFERENCES = {"expand": expand_reference, "reduce": reduce_reference}


# -- 3. a Linear called T times in one forward -----------------------------------------------
class LoopedCell(nn.Module):
    """The same ``nn.Linear`` called on each of the ``T = 3`` positions (a Python loop)."""

    def __init__(self, looped: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.looped = looped
        self.cell = nn.Linear(4, 4)
        self.head = nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:  # x: (N, 3, 4)
        if self.looped:
            h = torch.cat([torch.tanh(self.cell(x[:, t])) for t in range(3)], dim=1)
        else:
            h = torch.tanh(self.cell(x)).flatten(1)  # one call on (N, 3, 4)
        return self.head(h)


@pytest.mark.parametrize("approximation", ["expand", "reduce"])
def test_linear_called_three_times_equals_one_call_on_concatenated_input(
    approximation: str,
) -> None:
    """Three calls of one Linear in a forward are the positions ``t`` of one use: its factors and
    step equal one call on the ``(N, 3, d)`` input, and both equal the dense formula — expand
    ``A = Σ_{n,t} a aᵀ/(N·T)``, ``G = Σ_{n,t} g gᵀ/N``; reduce ``a_n = (1/T) Σ_t a``,
    ``g_n = Σ_t g``, ``A = Σ_n a_n a_nᵀ/N``, ``G = Σ_n g_n g_nᵀ/N`` — with the dense solve."""
    x, y = data(6, 3, 4, seed=1)
    looped, concatenated = LoopedCell(True), LoopedCell(False)
    reference = copy.deepcopy(concatenated)
    calls = Recorder(cell=reference.cell).per_sample(
        len(x), lambda n: F.cross_entropy(reference(x[n : n + 1]), y[n : n + 1])
    )["cell"]
    rows = [linear_rows(c, bias=True) for c in calls]
    assert rows[0][0].shape == (3, 5)
    A, G, dW = REFERENCES[approximation](rows)

    results = []
    for model in (looped, concatenated):
        pre = train_step(model, lambda m: F.cross_entropy(m(x), y), approximation=approximation)
        block = pre.block("cell.weight")
        results.append((block.a.value[0], block.g.value[0], linear_matrix(model.cell)))
    (a_loop, g_loop, step_loop), (a_cat, g_cat, step_cat) = results
    assert_close(a_loop, a_cat, rtol=1e-12, atol=1e-14)
    assert_close(g_loop, g_cat, rtol=1e-12, atol=1e-14)
    assert_close(step_loop, step_cat, rtol=1e-9, atol=1e-12)
    a_value, g_value, step = results[0]
    assert_close(a_value, A, rtol=FACTOR_RTOL, atol=FACTOR_ATOL)
    assert_close(g_value, G, rtol=FACTOR_RTOL, atol=FACTOR_ATOL)
    assert_close(step, dense_damped_kron_solve(A, G, dW, DAMPING), rtol=STEP_RTOL, atol=STEP_ATOL)
    other = "reduce" if approximation == "expand" else "expand"
    A_o, G_o, _ = REFERENCES[other](rows)
    assert_differs(step, dense_damped_kron_solve(A_o, G_o, dW, DAMPING))  # could fail


class RecurrentCell(nn.Module):
    """An unrolled RNN: ``h_t = tanh(cell([x_t; h_{t-1}]))``, the same Linear at every step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.cell = nn.Linear(4 + 3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:  # x: (N, 3, 4)
        h = torch.zeros(x.shape[0], 3)
        for t in range(x.shape[1]):
            h = torch.tanh(self.cell(torch.cat([x[:, t], h], dim=1)))
        return self.head(h)


@pytest.mark.parametrize("approximation", ["expand", "reduce"])
def test_unrolled_recurrent_cell_factors_and_step_equal_dense(approximation: str) -> None:
    """A recurrent cell (inputs depend on earlier calls' outputs): each call's ``a`` and per-sample
    output gradient ``g = ∂l_n/∂s_t`` (autograd on sample ``n`` alone) give the dense expand /
    reduce factors over the ``T = 3`` calls, and the step is the dense Kronecker solve."""
    x, y = data(5, 3, 4, classes=2, seed=2)
    model = RecurrentCell()
    reference = copy.deepcopy(model)
    calls = Recorder(cell=reference.cell).per_sample(
        len(x), lambda n: F.cross_entropy(reference(x[n : n + 1]), y[n : n + 1])
    )["cell"]
    rows = [linear_rows(c, bias=True) for c in calls]
    A, G, dW = REFERENCES[approximation](rows)
    F.cross_entropy(reference(x), y).backward()
    assert_close(linear_matrix(reference.cell), dW, rtol=1e-10, atol=1e-13)

    pre = train_step(model, lambda m: F.cross_entropy(m(x), y), approximation=approximation)
    block = pre.block("cell.weight")
    assert_close(block.a.value[0], A, rtol=FACTOR_RTOL, atol=FACTOR_ATOL)
    assert_close(block.g.value[0], G, rtol=FACTOR_RTOL, atol=FACTOR_ATOL)
    step = linear_matrix(model.cell)
    assert_close(step, dense_damped_kron_solve(A, G, dW, DAMPING), rtol=STEP_RTOL, atol=STEP_ATOL)
    # could fail: the factors of the last call alone are another step
    last = expand_reference([linear_rows(c[-1:], bias=True) for c in calls])
    assert_differs(step, dense_damped_kron_solve(last[0], last[1], dW, DAMPING))


# -- 4. tied parameters ----------------------------------------------------------------------
class TiedLM(nn.Module):
    """Embedding ``[V, E]`` and an LM head ``Linear(E, V)`` whose weight is the same parameter
    (``tied``) or a copy (the untied twin)."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(7, 3)
        self.head = nn.Linear(3, 7, bias=False)
        if tied:
            self.head.weight = self.emb.weight
        else:
            with torch.no_grad():
                self.head.weight.copy_(self.emb.weight)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(ids)))


def lm_loss(model: nn.Module, ids: Tensor, targets: Tensor) -> Tensor:
    """Mean over the ``N·T`` tokens = mean over samples of each sample's mean token loss."""
    return F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())


@pytest.mark.parametrize(
    ("steps", "factor_update_interval"),
    [(1, 1), (2, 1), (2, 2)],
    ids=["first_step", "second_step", "step_without_factor_update"],
)
def test_tied_embedding_and_head_step_is_the_sum_of_the_two_uses_dense_solves(
    steps: int, factor_update_interval: int
) -> None:
    """Per-use factors: embedding ``A_e = diag(counts)/(N·T)``, ``G_e = Σ g gᵀ/N`` (``[E, E]``);
    head ``A_h = Σ h hᵀ/(N·T)``, ``G_h = Σ g gᵀ/N`` (``[V, V]``). The tied weight's step is
    ``solve(A_e ⊗ G_e, dL_e)ᵀ + solve(A_h ⊗ G_h, dW_h)`` with each use's own gradient, which is
    also the untied twin's two preconditioned gradients summed — from the first ``step()`` on
    (the structure is fixed there), as for every other parameter, and on steps that capture no
    factors (the per-use gradients are still traced there)."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 6, (5, 4), generator=gen)  # token 6 never occurs
    targets = torch.randint(0, 7, (5, 4), generator=gen)
    tied, untied = TiedLM(True), TiedLM(False)
    assert tied.emb.weight is tied.head.weight
    reference = copy.deepcopy(tied)
    calls = Recorder(emb=reference.emb, head=reference.head).per_sample(
        len(ids), lambda n: lm_loss(reference, ids[n : n + 1], targets[n : n + 1])
    )
    emb_rows = []
    for ((token_ids, g),) in calls["emb"]:
        emb_rows.append((F.one_hot(token_ids.reshape(-1), 7).double(), g.reshape(-1, 3)))
    A_e, G_e, dL_e = expand_reference(emb_rows)
    A_h, G_h, dW_h = expand_reference([linear_rows(c, bias=False) for c in calls["head"]])
    lm_loss(reference, ids, targets).backward()
    assert_close(reference.emb.weight.grad, dL_e.T + dW_h, rtol=1e-10, atol=1e-13)

    interval = {"factor_update_interval": factor_update_interval}
    pre = train_step(tied, lambda m: lm_loss(m, ids, targets), steps=steps, **interval)
    train_step(untied, lambda m: lm_loss(m, ids, targets), steps=steps, **interval)
    emb_block, head_block = pre.block("emb.weight", site="emb"), pre.block("emb.weight", "head")
    assert emb_block is not head_block
    assert_close(emb_block.a.value[0], torch.diagonal(A_e), rtol=FACTOR_RTOL, atol=FACTOR_ATOL)
    assert_close(emb_block.g.value[0], G_e, rtol=FACTOR_RTOL, atol=FACTOR_ATOL)
    assert_close(head_block.a.value[0], A_h, rtol=FACTOR_RTOL, atol=FACTOR_ATOL)
    assert_close(head_block.g.value[0], G_h, rtol=FACTOR_RTOL, atol=FACTOR_ATOL)

    emb_step = dense_damped_kron_solve(A_e, G_e, dL_e, DAMPING).T
    head_step = dense_damped_kron_solve(A_h, G_h, dW_h, DAMPING)
    step = tied.emb.weight.grad
    assert_close(step, emb_step + head_step, rtol=STEP_RTOL, atol=STEP_ATOL)
    assert_close(untied.emb.weight.grad, emb_step, rtol=STEP_RTOL, atol=STEP_ATOL)
    assert_close(untied.head.weight.grad, head_step, rtol=STEP_RTOL, atol=STEP_ATOL)
    twin_sum = untied.emb.weight.grad + untied.head.weight.grad
    assert_close(step, twin_sum, rtol=1e-9, atol=1e-12)
    # could fail: preconditioning the summed gradient with one use's factors is another step
    dW = dL_e.T + dW_h
    assert_differs(step, dense_damped_kron_solve(A_h, G_h, dW, DAMPING))
    assert_differs(step, dense_damped_kron_solve(A_e, G_e, dW.T, DAMPING).T)


class SharedLinears(nn.Module):
    """Two ``nn.Linear`` modules (own biases) sharing one weight, or an untied copy."""

    def __init__(self, tied: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)
        if tied:
            self.second.weight = self.first.weight
        else:
            with torch.no_grad():
                self.second.weight.copy_(self.first.weight)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


@pytest.mark.parametrize("steps", [1, 2], ids=["first_step", "second_step"])
def test_two_linears_sharing_a_weight_sum_their_uses_dense_solves(steps: int) -> None:
    """``P_u = unvec((A_u ⊗ G_u + λI)^-1 vec([dW_u db_u]))`` per use ``u`` (dense per-sample
    factors); the shared weight's step is ``P_1[:, :d] + P_2[:, :d]``, each bias gets its own
    use's last column — the untied twin's steps, with the two weight steps summed (from the
    first ``step()`` on)."""
    x, y = data(6, 4, seed=4)
    tied, untied = SharedLinears(True), SharedLinears(False)
    reference = copy.deepcopy(tied)
    calls = Recorder(first=reference.first, second=reference.second).per_sample(
        len(x), lambda n: F.cross_entropy(reference(x[n : n + 1]), y[n : n + 1])
    )
    refs = {k: expand_reference([linear_rows(c, bias=True) for c in v]) for k, v in calls.items()}
    solves = {k: dense_damped_kron_solve(A, G, dW, DAMPING) for k, (A, G, dW) in refs.items()}

    pre = train_step(tied, lambda m: F.cross_entropy(m(x), y), steps=steps)
    train_step(untied, lambda m: F.cross_entropy(m(x), y), steps=steps)
    for site in ("first", "second"):
        block = pre.block("first.weight", site=site)
        A, G, _ = refs[site]
        assert_close(block.a.value[0], A, rtol=FACTOR_RTOL, atol=FACTOR_ATOL)
        assert_close(block.g.value[0], G, rtol=FACTOR_RTOL, atol=FACTOR_ATOL)
    weight_step = solves["first"][:, :4] + solves["second"][:, :4]
    assert_close(tied.first.weight.grad, weight_step, rtol=STEP_RTOL, atol=STEP_ATOL)
    assert_close(tied.first.bias.grad, solves["first"][:, 4], rtol=STEP_RTOL, atol=STEP_ATOL)
    assert_close(tied.second.bias.grad, solves["second"][:, 4], rtol=STEP_RTOL, atol=STEP_ATOL)
    assert_close(
        tied.first.weight.grad,
        untied.first.weight.grad + untied.second.weight.grad,
        rtol=1e-9,
        atol=1e-12,
    )
    assert_close(tied.second.bias.grad, untied.second.bias.grad, rtol=1e-9, atol=1e-12)
    assert_differs(tied.first.weight.grad, solves["first"][:, :4] * 2)  # could fail


# -- 5. twins: nn.MultiheadAttention and GPT-2 Conv1D as nn.Linear ---------------------------
E, HEADS = 4, 2


class AttentionNet(nn.Module):
    """``nn.MultiheadAttention`` on batch-first data ``(N, L, E)`` (transposed inside when the
    attention is not ``batch_first``); ``memory`` ``(N, S, E)`` makes it cross-attention."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first)
        with torch.no_grad():
            self.attn.in_proj_bias.normal_(0, 0.3)
            self.attn.out_proj.bias.normal_(0, 0.3)
        self.head = nn.Linear(E, 3)

    def forward(self, x: Tensor, memory: Tensor | None = None) -> Tensor:
        q = x if self.batch_first else x.transpose(0, 1)
        kv = q if memory is None else (memory if self.batch_first else memory.transpose(0, 1))
        out = self.attn(q, kv, kv, need_weights=False)[0]
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(torch.tanh(out).mean(1))


class AttentionTwin(nn.Module):
    """The same function with ``nn.Linear``: packed ``in_proj`` ``Linear(E, 3E)`` for
    self-attention, ``q`` ``Linear(E, E)`` and ``kv`` ``Linear(E, 2E)`` for cross-attention."""

    def __init__(self, source: AttentionNet, cross: bool) -> None:
        super().__init__()
        self.cross = cross
        weight, bias = source.attn.in_proj_weight.detach(), source.attn.in_proj_bias.detach()
        if cross:
            self.q, self.kv = nn.Linear(E, E), nn.Linear(E, 2 * E)
            pairs = [(self.q, slice(0, E)), (self.kv, slice(E, 3 * E))]
        else:
            self.in_proj = nn.Linear(E, 3 * E)
            pairs = [(self.in_proj, slice(0, 3 * E))]
        self.out_proj = nn.Linear(E, E)
        self.head = nn.Linear(E, 3)
        with torch.no_grad():
            for layer, rows in pairs:
                layer.weight.copy_(weight[rows])
                layer.bias.copy_(bias[rows])
            self.out_proj.load_state_dict(source.attn.out_proj.state_dict())
            self.head.load_state_dict(source.head.state_dict())

    def forward(self, x: Tensor, memory: Tensor | None = None) -> Tensor:
        if self.cross:
            q = self.q(x)
            k, v = self.kv(memory).chunk(2, dim=-1)
        else:
            q, k, v = self.in_proj(x).chunk(3, dim=-1)

        def heads(t: Tensor) -> Tensor:  # (N, L, E) -> (N, H, L, E/H)
            return t.unflatten(-1, (HEADS, E // HEADS)).transpose(1, 2)

        q, k, v = heads(q), heads(k), heads(v)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(E // HEADS), dim=-1)
        out = (weights @ v).transpose(1, 2).flatten(2)
        return self.head(torch.tanh(self.out_proj(out)).mean(1))


def attention_steps(model: nn.Module, cross: bool) -> dict[str, Tensor]:
    """Preconditioned gradients in the twin's layout (``in_proj`` rows split for cross)."""
    if isinstance(model, AttentionTwin):
        projections = [model.q, model.kv] if cross else [model.in_proj]
        return {
            "in_proj": torch.cat([linear_matrix(p) for p in projections]),
            "out_proj": linear_matrix(model.out_proj),
            "head": linear_matrix(model.head),
        }
    attn = model.attn
    return {
        "in_proj": torch.cat([attn.in_proj_weight.grad, attn.in_proj_bias.grad[:, None]], 1),
        "out_proj": linear_matrix(attn.out_proj),
        "head": linear_matrix(model.head),
    }


@pytest.mark.parametrize("approximation", ["expand", "reduce"])
@pytest.mark.parametrize(
    "batch_first, cross",
    [(True, False), (False, False), (True, True), (False, True)],
    ids=["self_batch_first", "self_seq_first", "cross_batch_first", "cross_seq_first"],
)
def test_multihead_attention_equals_its_linear_twin(
    batch_first: bool, cross: bool, approximation: str
) -> None:
    """``nn.MultiheadAttention`` (its ``in_proj_weight`` packed, or split into q / kv row blocks
    for cross-attention, and ``out_proj`` whose module is never called) gets the step of the same
    function written with ``nn.Linear`` layers, whose blocks the dense tests hold to
    ``unvec((A ⊗ G + λI)^-1 vec(dW))`` (expand and reduce)."""
    x, y = data(5, 3, E, seed=5)  # N = 5, L = 3
    memory = torch.randn(5, 2, E, generator=torch.Generator().manual_seed(6)) if cross else None
    model = AttentionNet(batch_first)
    twin = AttentionTwin(model, cross)
    with torch.no_grad():
        assert_close(model(x, memory), twin(x, memory), rtol=1e-12, atol=1e-14)
    raw_model = copy.deepcopy(model)
    F.cross_entropy(raw_model(x, memory), y).backward()
    raw = attention_steps(raw_model, cross)
    options = dict(approximation=approximation)
    pre = train_step(model, lambda m: F.cross_entropy(m(x, memory), y), **options)
    pre_twin = train_step(twin, lambda m: F.cross_entropy(m(x, memory), y), **options)
    expected_uses = 4 if cross else 3  # (q, kv | packed in_proj), out_proj, head
    assert len(pre.blocks) == len(pre_twin.blocks) == expected_uses
    assert pre.preconditioned_fraction == 1.0
    mine, theirs = attention_steps(model, cross), attention_steps(twin, cross)
    for name in ("in_proj", "out_proj", "head"):
        assert_close(mine[name], theirs[name], rtol=1e-8, atol=1e-11)
    out_block = pre.block("attn.out_proj.weight")
    twin_block = pre_twin.block("out_proj.weight")
    for a, b in zip(out_block.factors, twin_block.factors, strict=True):
        assert_close(a.value, b.value, rtol=1e-10, atol=1e-13)
    # could fail: out_proj (whose module is never called) and in_proj were preconditioned
    assert_differs(mine["out_proj"], raw["out_proj"])
    assert_differs(mine["in_proj"], raw["in_proj"])


class ProjectionNet(nn.Module):
    def __init__(self, gpt2: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = Conv1D(6, 4) if gpt2 else nn.Linear(4, 6)
        self.head = nn.Linear(3 * 6, 3)

    def forward(self, x: Tensor) -> Tensor:  # x: (N, 3, 4)
        return self.head(torch.tanh(self.proj(x)).flatten(1))


@pytest.mark.parametrize("approximation", ["expand", "reduce"])
def test_gpt2_conv1d_equals_linear_with_transposed_weight(approximation: str) -> None:
    """``Conv1D`` is ``s = Wᵀ x + b`` with ``W`` ``(nx, nf)``: its factors and step equal
    ``nn.Linear`` with weight ``Wᵀ`` on the same ``(N, T, nx)`` input (``P_conv1d = P_linearᵀ``),
    and both equal the dense formula (expand or reduce over the ``T = 3`` positions)."""
    x, y = data(5, 3, 4, seed=7)
    gpt2, linear = ProjectionNet(True), ProjectionNet(False)
    with torch.no_grad():
        linear.proj.weight.copy_(gpt2.proj.weight.T)
        linear.proj.bias.copy_(gpt2.proj.bias)
        linear.head.load_state_dict(gpt2.head.state_dict())
    reference = copy.deepcopy(linear)
    calls = Recorder(proj=reference.proj).per_sample(
        len(x), lambda n: F.cross_entropy(reference(x[n : n + 1]), y[n : n + 1])
    )["proj"]
    A, G, dW = REFERENCES[approximation]([linear_rows(c, bias=True) for c in calls])

    pre = train_step(gpt2, lambda m: F.cross_entropy(m(x), y), approximation=approximation)
    pre_linear = train_step(linear, lambda m: F.cross_entropy(m(x), y), approximation=approximation)
    block = pre.block("proj.weight")
    assert block.spec.transposed_form
    for b in (block, pre_linear.block("proj.weight")):
        assert_close(b.a.value[0], A, rtol=FACTOR_RTOL, atol=FACTOR_ATOL)
        assert_close(b.g.value[0], G, rtol=FACTOR_RTOL, atol=FACTOR_ATOL)
    expected = dense_damped_kron_solve(A, G, dW, DAMPING)
    step = torch.cat([gpt2.proj.weight.grad.T, gpt2.proj.bias.grad[:, None]], dim=1)
    assert_close(step, expected, rtol=STEP_RTOL, atol=STEP_ATOL)
    assert_close(linear_matrix(linear.proj), expected, rtol=STEP_RTOL, atol=STEP_ATOL)
    other = "reduce" if approximation == "expand" else "expand"
    A_o, G_o, _ = REFERENCES[other]([linear_rows(c, bias=True) for c in calls])
    assert_differs(step, dense_damped_kron_solve(A_o, G_o, dW, DAMPING))  # could fail
