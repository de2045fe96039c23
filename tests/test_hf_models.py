"""Models nobody here wrote — Hugging Face transformers built from small configs, no download —
trained through ``KFACDDPStrategy`` on real gloo processes, fed as their users feed them: dict
batches padded per batch (dynamic padding) with an ``attention_mask``, HF's default position ids,
``labels=`` with ``-100`` on padding.

- BERT classification with dynamic padding and GPT-2 with ``labels=-100`` on its padding:
  2 ranks × B equals 1 rank × 2B in float64 (each rank pads its own batch to its own longest:
  only the padding mask makes the factors additive), both distribution modes;
- T5, Llama (tied and untied head), ViT and a peft LoRA Llama: ≥ 99 % of trainable elements
  preconditioned and bit-identical float32 replicas on 2 ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_kfac import KFACDDPStrategy
from tests import hf_models
from tests._dist_models import RankResult, load_ranks
from tests.lightning_support import SaveResult, relative_difference, trainer_kwargs

VOCAB, HIDDEN, PAD = 40, 16, 0
#: Sequence lengths: samples (2i, 2i+1) go to ranks 0 and 1 at B = 2 per rank; each step's two
#: rank batches have the same number of real tokens (6 + 2 = 4 + 4, 7 + 1 = 4 + 4, ...) so that
#: GPT-2's token-mean loss averages like the single process's, but different longest lengths.
LENGTHS = [6, 4, 2, 4, 7, 4, 1, 4, 3, 5, 5, 3, 2, 6, 6, 2]


def sequences() -> list[dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(5)
    return [
        {"input_ids": torch.randint(1, VOCAB, (n,), generator=gen), "label": torch.tensor(i % 3)}
        for i, n in enumerate(LENGTHS)
    ]


def pad_batch(items: list[dict[str, Tensor]], kind: str) -> dict[str, Tensor]:
    """Dynamic padding: to the batch's own longest sequence, as a data collator does."""
    longest = max(len(item["input_ids"]) for item in items)
    ids = torch.full((len(items), longest), PAD)
    mask = torch.zeros(len(items), longest, dtype=torch.long)
    for n, item in enumerate(items):
        ids[n, : len(item["input_ids"])] = item["input_ids"]
        mask[n, : len(item["input_ids"])] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if kind == "bert":
        batch["labels"] = torch.stack([item["label"] for item in items])
    else:
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    return batch


class HFModule(pl.LightningModule):
    """An unmodified HF model: ``training_step`` returns ``model(**batch).loss``."""

    def __init__(self, kind: str, batch_size: int, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        builders = {
            "bert": lambda: hf_models.bert_classifier(VOCAB, HIDDEN),
            "gpt2": lambda: hf_models.gpt2_lm(VOCAB, HIDDEN),
            "t5": lambda: hf_models.t5(VOCAB, HIDDEN),
            "llama": lambda: hf_models.llama(VOCAB, HIDDEN, tie=False),
            "llama_tied": lambda: hf_models.llama(VOCAB, HIDDEN, tie=True),
            "vit": lambda: hf_models.vit(HIDDEN),
            "lora": lambda: hf_models.lora_llama(VOCAB, HIDDEN),
        }
        self.model = builders[kind]().to(dtype)
        self.batch_size = batch_size

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(trainable, lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        if self.kind == "vit":
            gen = torch.Generator().manual_seed(5)
            images = torch.randn(16, 3, 8, 8, generator=gen, dtype=self.dtype)
            data = [
                {"pixel_values": x, "labels": torch.tensor(i % 3)} for i, x in enumerate(images)
            ]
            collate = None
        else:
            data = sequences()
            collate = lambda items: pad_batch(items, self.kind)  # noqa: E731
        # Rank r of R takes samples r, r + R, ... in order (the trainer's own sampler is off):
        # the pairs LENGTHS is built around
        rank, world = self.trainer.global_rank, self.trainer.world_size
        return DataLoader(data[rank::world], batch_size=self.batch_size, collate_fn=collate)


def fit_rank_zero(tmp_path: Path, name: str, kind: str, devices: int, mode: str) -> dict[str, Any]:
    path = tmp_path / f"{name}.pt"
    strategy = KFACDDPStrategy(
        start_method="fork", distribution_mode=mode, damping=1e-2, inverse_update_interval=2,
        kl_clip=1e-2,
    )  # fmt: skip
    trainer = pl.Trainer(
        strategy=strategy, devices=devices, max_steps=4, callbacks=[SaveResult(path)],
        **trainer_kwargs(tmp_path, use_distributed_sampler=False),
    )  # fmt: skip
    trainer.fit(HFModule(kind, batch_size=4 // devices))
    return torch.load(path)


@pytest.mark.parametrize("mode", ["broadcast_decompositions", "broadcast_gradients"])
@pytest.mark.parametrize("kind", ["bert", "gpt2", "t5"])
def test_dynamically_padded_batches_two_ranks_equal_one_rank(
    tmp_path: Path, kind: str, mode: str
) -> None:
    two = fit_rank_zero(tmp_path, "two", kind, 2, mode)
    one = fit_rank_zero(tmp_path, "one", kind, 1, mode)
    assert two["kfac_steps"] == one["kfac_steps"] == 4
    # T5's relative-position buckets have no samples' dimension: named, left to the optimizer
    assert two["preconditioned_fraction"] == (
        1.0 if kind != "t5" else pytest.approx(0.9963, abs=1e-3)
    )
    assert relative_difference(two["params"], one["params"]) <= 1e-9
    start = {n: p for n, p in HFModule(kind, 2).named_parameters() if n in one["params"]}
    assert relative_difference(one["params"], start) > 1e-3  # K-FAC moved the weights


@pytest.mark.parametrize("kind", ["t5", "llama", "llama_tied", "vit", "lora"])
def test_models_train_on_two_ranks_covered_with_bitwise_replicas(tmp_path: Path, kind: str) -> None:
    strategy = KFACDDPStrategy(start_method="fork", inverse_update_interval=3, kl_clip=1e-2)
    trainer = pl.Trainer(
        strategy=strategy, devices=2, max_steps=6, callbacks=[RankResult(tmp_path, kind)],
        **trainer_kwargs(tmp_path, use_distributed_sampler=False),
    )  # fmt: skip
    trainer.fit(HFModule(kind, batch_size=2, dtype=torch.float32))
    first, second = load_ranks(tmp_path, kind, 2)
    assert first["kfac_steps"] == second["kfac_steps"] == 6
    assert first["preconditioned_fraction"] >= 0.99, first["warnings"]
    for name, value in first["params"].items():
        assert torch.equal(value, second["params"][name]), name
    for name, values in first["factors"].items():
        for mine, theirs in zip(values, second["factors"][name], strict=True):
            assert torch.equal(mine, theirs), name


def test_bert_step_is_the_same_padded_to_16_and_to_32() -> None:
    """The reported case: the same sequences padded to 16 and to 32 tokens give BERT the same
    K-FAC step (it was 6.6 % apart when padded rows counted)."""
    from lightning_kfac import KFACPreconditioner

    grads = []
    for length in (16, 32):
        module = HFModule("bert", 4)
        batch = pad_batch(sequences()[:8], "bert")
        extra = length - batch["input_ids"].shape[1]
        batch = {
            k: torch.nn.functional.pad(v, (0, extra)) if v.dim() == 2 else v
            for k, v in batch.items()
        }
        pre = KFACPreconditioner(module.model, kl_clip=None, damping=1e-2)
        module.model(**batch).loss.backward()
        pre.step()
        grads.append({n: p.grad.clone() for n, p in module.model.named_parameters()})
    for name, grad in grads[0].items():
        scale = float(grad.abs().max())
        assert float((grad - grads[1][name]).abs().max()) <= 1e-12 * max(scale, 1.0), name
