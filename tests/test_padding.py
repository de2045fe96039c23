"""Padding: positions marked as padding are not positions (docs/design.md, "Padding"), float64.

A token model fed the same sequences padded to 16 and to 32 positions computes the same loss and
gradients (padding never reaches the loss); with the batch's ``attention_mask`` K-FAC forms the
same factors and takes the same step, and its input factors average over the real positions
only — the dense reference below. Without a mask (``padding_mask=None``) padding rows would count.
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

VOCAB, DIM, CLASSES, PAD = 20, 6, 3, 0
LENGTHS = [5, 2, 7, 3]


class TokenModel(nn.Module):
    """Embedding (+ a learned ``[1, T]`` position lookup), a per-token MLP with LayerNorm and an
    RMS-style scale, masked mean pooling: padding positions never reach the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, DIM)
        self.positions = nn.Embedding(32, DIM)
        self.hidden = nn.Linear(DIM, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.scale = nn.Parameter(torch.ones(DIM))
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0)  # [1, T], as HF's default
        h = self.tokens(input_ids) + self.positions(position_ids)
        h = self.scale * self.norm(torch.tanh(self.hidden(h)))
        weights = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * weights).sum(1) / weights.sum(1))


def batch(length: int) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.full((len(LENGTHS), length), PAD)
    mask = torch.zeros(len(LENGTHS), length, dtype=torch.long)
    for n, real in enumerate(LENGTHS):
        ids[n, :real] = torch.randint(1, VOCAB, (real,), generator=gen)
        mask[n, :real] = 1
    return ids, mask, torch.tensor([0, 1, 2, 1])


def kfac_step(length: int, **options) -> tuple[nn.Module, KFACPreconditioner]:
    torch.manual_seed(0)
    model = TokenModel()
    ids, mask, labels = batch(length)
    pre = KFACPreconditioner(model, damping=1e-2, kl_clip=None, **options)
    F.cross_entropy(model(input_ids=ids, attention_mask=mask), labels).backward()
    pre.step()
    return model, pre


def test_the_step_does_not_depend_on_padding() -> None:
    (short, pre_short), (long, pre_long) = kfac_step(16), kfac_step(32)
    assert pre_short.preconditioned_fraction == pre_long.preconditioned_fraction == 1.0
    for mine, theirs in zip(short.parameters(), long.parameters(), strict=True):
        assert_close(mine.grad, theirs.grad, rtol=1e-12, atol=1e-15)
    for name, block in pre_short.blocks.items():
        for mine, theirs in zip(block.factors, pre_long.blocks[name].factors, strict=True):
            assert_close(mine.value, theirs.value, rtol=1e-12, atol=1e-15)


def test_without_a_mask_padding_rows_would_count() -> None:
    (masked, _), (unmasked, _) = kfac_step(16), kfac_step(16, padding_mask=None)
    assert_differs(masked.hidden.weight.grad, unmasked.hidden.weight.grad)
    (_, short), (_, long) = kfac_step(16, padding_mask=None), kfac_step(32, padding_mask=None)
    assert_differs(short.block("hidden.weight").a.value, long.block("hidden.weight").a.value)


def test_a_callable_names_the_mask() -> None:
    """``padding_mask`` as a callable of the batch (here the forward's keyword arguments)."""
    (by_key, _), (by_callable, _) = (
        kfac_step(16),
        kfac_step(16, padding_mask=lambda inputs: inputs["attention_mask"]),
    )
    for mine, theirs in zip(by_key.parameters(), by_callable.parameters(), strict=True):
        assert torch.equal(mine.grad, theirs.grad)


def test_a_mask_of_another_shape_is_refused_with_the_fix() -> None:
    with pytest.raises(
        ValueError, match=r"padding_mask=.* not an \[N, T\] mask.*padding_mask=None"
    ):
        kfac_step(16, padding_mask=lambda inputs: inputs["attention_mask"][:2])
    with pytest.raises(ValueError, match="padding_mask must be a key of the batch"):
        KFACPreconditioner(TokenModel(), kl_clip=None, padding_mask=3)


def test_input_factor_averages_the_real_positions_only() -> None:
    """Dense reference for the hidden layer: ``A = Σ_{real (n,t)} [x; 1][x; 1]ᵀ / #real``."""
    torch.manual_seed(0)
    model = TokenModel()
    ids, mask, labels = batch(16)
    seen = {}
    handle = model.hidden.register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach()))
    pre = KFACPreconditioner(model, damping=1e-2, kl_clip=None)
    F.cross_entropy(model(input_ids=ids, attention_mask=mask), labels).backward()
    handle.remove()
    pre.step()
    rows = seen["x"][mask.bool()]
    a = torch.cat([rows, torch.ones(rows.shape[0], 1)], dim=1)
    assert_close(
        pre.block("hidden.weight").a.value[0], a.T @ a / a.shape[0], rtol=1e-12, atol=1e-15
    )
    counts = torch.zeros(VOCAB)
    counts.index_add_(0, ids[mask.bool()], torch.ones(int(mask.sum())))
    assert_close(pre.block("tokens.weight").a.value[0], counts / mask.sum(), rtol=1e-12, atol=1e-15)


def test_a_broadcast_position_lookup_gets_per_sample_factors() -> None:
    """``positions([1, T] ids)`` is shared by the samples and broadcast against them: its ``G`` is
    ``(1/N) Σ_n Σ_t g_{n,t} g_{n,t}ᵀ`` with each sample's own output gradient (each sample run
    alone here), not the outer product of the batch-summed one."""
    torch.manual_seed(0)
    model = TokenModel()
    ids, mask, labels = batch(16)
    outputs = []
    handle = model.positions.register_forward_hook(lambda m, i, o: outputs.append(o))
    G = torch.zeros(DIM, DIM)
    for n in range(len(LENGTHS)):
        outputs.clear()
        loss = F.cross_entropy(model(ids[n : n + 1], mask[n : n + 1]), labels[n : n + 1])
        (g,) = torch.autograd.grad(loss, outputs[0])  # ∂l_n/∂s, [1, T, E]
        G += g[0].T @ g[0]
    handle.remove()
    G /= len(LENGTHS)
    pre = KFACPreconditioner(model, damping=1e-2, kl_clip=None)
    F.cross_entropy(model(input_ids=ids, attention_mask=mask), labels).backward()
    pre.step()
    block = pre.block("positions.weight")
    assert_close(block.g.value[0], G, rtol=1e-10, atol=1e-13)
    real = torch.zeros(32)
    for length in LENGTHS:
        real[:length] += 1
    assert_close(block.a.value[0], real / sum(LENGTHS), rtol=1e-12, atol=1e-15)
