"""Coverage you can see, on models nobody here wrote (issue 8, items 6 and 8).

Built without downloads: ``nn.TransformerEncoder`` (PyTorch's default sequence-first layout) with
a tied embedding/head, a GPT-2 written from HF's public structure (``Conv1D`` = ``addmm`` with a
``(nx, nf)`` weight, learned positions, tied ``lm_head``), a CNN with BatchNorm and GroupNorm, and
Lightning's own demo ``Transformer`` (``nn.Transformer`` encoder-decoder: cross-attention splits
``in_proj_weight`` into q and kv rows). Each must get ≥ 95 % of its trainable parameter elements
preconditioned, and whatever is left must be named with its reason.
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.demos.transformer import Transformer as DemoTransformer
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor, nn

from lightning_kfac import KFACCoverageWarning, KFACDDPStrategy, KFACPreconditioner
from tests.lightning_support import TinyClassifier, trainer_kwargs
from tests.references import Conv1D

VOCAB = 50


class EncoderLM(nn.Module):
    """``nn.TransformerEncoder`` in its default ``(T, N, E)`` layout, LM head tied."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, VOCAB, bias=False)
        self.head.weight = self.embedding.weight

    def forward(self, tokens: Tensor) -> Tensor:  # tokens (T, N)
        return self.head(self.encoder(self.embedding(tokens)))


class GPT2Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        hf = dict(weight_std=0.02, bias_std=0.0)
        self.c_attn, self.c_proj = Conv1D(3 * dim, dim, **hf), Conv1D(dim, dim, **hf)
        self.c_fc, self.mlp_proj = Conv1D(4 * dim, dim, **hf), Conv1D(dim, 4 * dim, **hf)
        self.heads = heads

    def forward(self, x: Tensor) -> Tensor:
        n, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(n, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(n, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT2(nn.Module):
    def __init__(self, dim: int = 16, layers: int = 2, positions: int = 8) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, dim), nn.Embedding(positions, dim)
        self.h = nn.ModuleList([GPT2Block(dim, 2) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight
        self.batched_positions = True

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1]).unsqueeze(0)  # HF's default [1, T] ids
        x = self.wte(tokens) + self.wpe(positions if self.batched_positions else positions[0])
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class NormCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False),
            nn.GroupNorm(2, 8),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(8, 10)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


def step_once(model: nn.Module, inputs: Tensor, targets: Tensor, **options) -> KFACPreconditioner:
    pre = KFACPreconditioner(model, kl_clip=None, **options)
    out = model(inputs)
    F.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1)).backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with warnings.catch_warnings():
        warnings.simplefilter("error", KFACCoverageWarning)  # full coverage: no warning at all
        pre.step()
    for report in pre.structure.reports:  # every preconditioned gradient really changed
        name = report.name
        if report.preconditioned and name in raw:
            assert not torch.equal(dict(model.named_parameters())[name].grad, raw[name]), name
    return pre


def test_encoder_lm_sequence_first_with_tied_head_is_fully_covered() -> None:
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (7, 4))  # (T, N)
    pre = step_once(EncoderLM(), tokens, tokens, batch_dim=1)
    assert pre.preconditioned_fraction == 1.0
    table = pre.coverage_report()
    assert "embedding.weight" in table and "Kronecker (2 uses)" in table
    assert "encoder.layers.0.self_attn.in_proj_weight" in table
    assert "encoder.layers.1.norm2.weight" in table and "unit-wise" in table


def test_gpt2_with_conv1d_and_tied_head_is_fully_covered() -> None:
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (3, 8))
    pre = step_once(GPT2(), tokens, tokens)
    assert pre.preconditioned_fraction == 1.0
    sites = {block.spec.site for block in pre.blocks.values()}
    assert {"h.0.c_attn", "h.1.mlp_proj", "lm_head", "wte", "wpe", "ln_f"} <= sites


def test_position_lookup_without_a_samples_dimension_is_named() -> None:
    """``wpe(arange(T))`` (indices ``[T]``): the lookup's gradient is summed over the samples
    before K-FAC could see it, so it cannot be a per-sample Kronecker block: left to the
    optimizer and named (``[1, T]`` indices, HF's default, are broadcast lookups and exact)."""
    torch.manual_seed(0)
    model = GPT2()
    model.batched_positions = False
    tokens = torch.randint(0, VOCAB, (3, 8))
    pre = KFACPreconditioner(model, kl_clip=None)
    F.cross_entropy(model(tokens).reshape(-1, VOCAB), tokens.reshape(-1)).backward()
    with pytest.warns(KFACCoverageWarning, match=r"wpe.weight \(used by embedding lookup of"):
        pre.step()
    assert all(b.spec.first_part.name != "wpe.weight" for b in pre.blocks.values())


def test_cnn_with_batch_and_group_norm_is_fully_covered() -> None:
    torch.manual_seed(0)
    pre = step_once(NormCNN(), torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,)))
    assert pre.preconditioned_fraction == 1.0
    assert pre.block("features.1.weight").unit_wise
    assert pre.block("features.4.weight").unit_wise


def test_lightning_demo_transformer_is_covered_and_trains() -> None:
    torch.manual_seed(0)
    model = DemoTransformer(vocab_size=VOCAB, ninp=16, nhead=2, nhid=32, nlayers=1, dropout=0.0)
    tokens = torch.randint(0, VOCAB, (4, 6))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = KFACPreconditioner(model, optimizer=optimizer, kl_clip=1e-3)  # damping 1e-3: clip
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = F.nll_loss(model(tokens, tokens), tokens.reshape(-1))
        loss.backward()
        pre.step()
        optimizer.step()
        losses.append(float(loss))
    assert pre.preconditioned_fraction >= 0.95
    # cross-attention splits in_proj_weight into its q rows and its kv rows: two uses, disjoint
    cross = "transformer.decoder.layers.0.multihead_attn.in_proj_weight"
    rows = sorted(b.spec.weight.rows for b in pre.blocks.values() if b.spec.weight.name == cross)
    assert rows == [(0, 16), (16, 48)]
    assert losses[-1] < losses[0]


def test_unsupported_uses_are_named_with_their_reason() -> None:
    class ScaledPositions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.positions = nn.Parameter(torch.ones(5, 4))  # used by a division
            self.layer = nn.Linear(4, 3)
            self.log_scale = nn.Parameter(torch.zeros(3))

        def forward(self, x: Tensor) -> Tensor:
            out = self.layer(x / self.positions)
            return out * torch.exp(self.log_scale)  # a function of the parameter, then a product

    torch.manual_seed(0)
    model = ScaledPositions()
    pre = KFACPreconditioner(model, kl_clip=None)
    F.cross_entropy(model(torch.randn(2, 5, 4)).sum(1), torch.tensor([0, 1])).backward()
    with pytest.warns(KFACCoverageWarning) as caught:
        pre.step()
    message = str(caught[0].message)
    assert "positions (used by div in the root module" not in message  # site is named
    assert "positions (used by div" in message and "log_scale (used by exp" in message
    assert math.isclose(pre.preconditioned_fraction, 15 / (20 + 15 + 3))
    table = pre.coverage_report()
    assert "left to the optimizer: used by div" in table


def test_preconditioned_fraction_is_logged_once_and_table_printed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer = pl.Trainer(
        strategy=KFACDDPStrategy(start_method="popen", kl_clip=None),  # 1 rank: in this process
        devices=1,
        max_steps=3,
        log_every_n_steps=1,
        logger=CSVLogger(tmp_path, name="csv", version=0),
        **{k: v for k, v in trainer_kwargs(tmp_path).items() if k != "logger"},
    )
    with caplog.at_level("INFO"):
        trainer.fit(TinyClassifier(batch_size=16))
    tables = [r.getMessage() for r in caplog.records if "K-FAC coverage" in r.getMessage()]
    assert len(tables) == 1 and "100.0 %" in tables[0]
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    values = [r["kfac/preconditioned_fraction"] for r in rows if r["kfac/preconditioned_fraction"]]
    assert values == ["1.0"]


def test_broadcast_bias_of_an_addmm_is_named_not_preconditioned() -> None:
    """``addmm`` broadcasts a one-element bias over every output: not the per-output bias K-FAC
    models, so the weight and bias are left to the optimizer with the reason."""

    class BroadcastBias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3))
            self.bias = nn.Parameter(torch.zeros(1))

        def forward(self, x: Tensor) -> Tensor:
            return torch.addmm(self.bias, x, self.weight)

    torch.manual_seed(0)
    model = BroadcastBias()
    pre = KFACPreconditioner(model, kl_clip=None)
    F.cross_entropy(model(torch.randn(2, 4)), torch.tensor([0, 1])).backward()
    with pytest.warns(KFACCoverageWarning, match="bias that does not match the weight's outputs"):
        pre.step()
    assert pre.preconditioned_fraction == 0.0
