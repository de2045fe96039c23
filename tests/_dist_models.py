"""Modules and callbacks for ``tests/test_distributed_guarantees.py``.

They live in an importable module (not in the test file) so that ``ddp_spawn`` can pickle them
and the subprocess script ``tests/_dist_script.py`` (popen launcher, timeouts) can use them.
Workers cannot return values: ``RankResult`` makes *every* rank write its own file.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.lightning_support import TinyClassifier


def rank_file(directory: Path | str, tag: str, rank: int) -> Path:
    return Path(directory) / f"{tag}-rank{rank}.pt"


def load_ranks(directory: Path | str, tag: str, world_size: int) -> list[dict[str, Any]]:
    return [torch.load(rank_file(directory, tag, r), weights_only=False) for r in range(world_size)]


class RankResult(pl.Callback):
    """Every rank writes its parameters, K-FAC state and a few observations to its own file.

    ``preconditioned_steps`` counts the steps at which K-FAC changed some gradient (raw gradients
    are recorded in ``on_after_backward``, compared in ``on_before_optimizer_step``, which Lightning
    calls after the K-FAC step). Warnings raised during ``fit`` are recorded too.
    """

    def __init__(self, directory: Path | str, tag: str = "result") -> None:
        self.directory = str(directory)
        self.tag = tag
        self.preconditioned_steps = 0
        self.observed_steps = 0
        self._raw: dict[str, torch.Tensor] = {}
        self._warnings: Any = None
        self._recorded: list[warnings.WarningMessage] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._warnings = warnings.catch_warnings(record=True)
        self._recorded = self._warnings.__enter__()
        warnings.simplefilter("always")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._warnings is not None:
            self._warnings.__exit__(None, None, None)
            self._warnings = None

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._raw = {
            n: p.grad.detach().clone()
            for n, p in pl_module.named_parameters()
            if p.grad is not None
        }

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self.observed_steps += 1
        changed = any(
            not torch.equal(p.grad, self._raw[n])
            for n, p in pl_module.named_parameters()
            if p.grad is not None and n in self._raw
        )
        self.preconditioned_steps += int(changed)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pre = getattr(trainer.strategy, "preconditioner", None)
        result: dict[str, Any] = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "params": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            "observed_steps": self.observed_steps,
            "preconditioned_steps": self.preconditioned_steps,
            "warnings": [f"{w.category.__name__}: {w.message}" for w in self._recorded],
            "distributor": None if pre is None else type(pre.distributor).__name__,
        }
        extra = getattr(pl_module, "observations", None)
        if extra is not None:
            result["observations"] = extra
        if pre is not None:
            result.update(
                kfac_steps=pre.steps,
                preconditioned_fraction=pre.preconditioned_fraction,
                factors={
                    name: [None if f.value is None else f.value.clone() for f in block.factors]
                    for name, block in pre.blocks.items()
                },
                decompositions={
                    name: [
                        None if f.decomposition is None else dict(f.decomposition)
                        for f in block.factors
                    ]
                    for name, block in pre.blocks.items()
                },
                seen={
                    name: [
                        bool(f.seen.all()) if f.seen is not None else False for f in block.factors
                    ]
                    for name, block in pre.blocks.items()
                },
                nonfinite_steps=None if pre.nonfinite_steps is None else int(pre.nonfinite_steps),
                launched_early=getattr(
                    getattr(pre.distributor, "allreduce", None), "launched_early", None
                ),
            )
        torch.save(result, rank_file(self.directory, self.tag, trainer.global_rank))


class StallAfterBackward(pl.Callback):
    """On ``rank`` at ``step``, sleep after the backward pass (inside Lightning's closure, before
    the K-FAC step): the other ranks are then waiting in a K-FAC collective of that step."""

    def __init__(self, rank: int, step: int, seconds: float, marker: Path | str) -> None:
        self.rank, self.step, self.seconds, self.marker = rank, step, seconds, str(marker)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            Path(self.marker).write_text(repr(time.time()))
            time.sleep(self.seconds)


# -- a tied embedding / LM head ---------------------------------------------------------------
VOCAB, WIDTH, LENGTH = 11, 6, 5


def next_token_loader(batch_size: int) -> DataLoader:
    """64 random token sequences and their next tokens (the language models' data)."""
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (64, LENGTH + 1), generator=gen)
    data = TensorDataset(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    return DataLoader(data, batch_size=batch_size)


class TiedLanguageModel(pl.LightningModule):
    """Embedding and output head share one weight: one parameter, two uses (K-FAC keeps factors
    per use and all-reduces the per-use gradients)."""

    def __init__(self, batch_size: int = 8, lr: float = 0.05) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(VOCAB, WIDTH)
        self.hidden = nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embedding.weight
        self.batch_size = batch_size
        self.lr = lr

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.embedding(tokens))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, targets = batch
        logits = self(tokens)
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return next_token_loader(self.batch_size)


# -- a branch some ranks take ---------------------------------------------------------------------
FEATURES, HIDDEN, CLASSES = 6, 8, 3


def branch_taken(mode: str, rank: int, step: int) -> bool:
    """Whether ``rank`` runs the branch at ``step``.

    - ``"rank0"``: rank 0 always, rank 1 never;
    - ``"alternating"``: rank ``step % 3`` (nobody when that is 2);
    - ``"late_rank1"``: rank 1 from step 2 on, nobody before (a use first seen after the structure
      was fixed, on one rank only).
    """
    if mode == "rank0":
        return rank == 0
    if mode == "alternating":
        return step % 3 == rank
    if mode == "late_rank1":
        return rank == 1 and step >= 2
    raise ValueError(mode)


class BranchClassifier(pl.LightningModule):
    """An MLP with a residual branch taken only on some ranks / steps (``branch_taken``).

    Whenever this rank takes the branch it records its input and output gradient, so that the
    parent can rebuild the branch's factors (DESIGN §2): ``A = mean_n a_n a_nᵀ`` with
    ``a_n = [x_n; 1]`` and ``G = mean_n g_n g_nᵀ`` with ``g_n = N · ∂loss/∂s_n``.
    """

    def __init__(self, mode: str, batch_size: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Linear(FEATURES, HIDDEN).double()
        self.branch = nn.Linear(HIDDEN, HIDDEN).double()
        self.out = nn.Linear(HIDDEN, CLASSES).double()
        self.mode = mode
        self.batch_size = batch_size
        #: ``step -> (branch input, branch output gradient)`` on this rank.
        self.observations: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inner(x))
        if self.training and branch_taken(self.mode, self.global_rank, self.global_step):
            step = self.global_step
            s = self.branch(h)
            self.observations[step] = (h.detach().clone(), None)

            def keep(gradient: torch.Tensor, step: int = step) -> None:
                self.observations[step] = (self.observations[step][0], gradient.detach().clone())

            s.register_hook(keep)
            h = h + torch.tanh(s)
        return self.out(h)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(4)
        x = torch.randn(96, FEATURES, generator=gen, dtype=torch.float64)
        y = torch.randint(0, CLASSES, (96,), generator=gen)
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size)


# -- non-finite inputs ---------------------------------------------------------------------------
class NaNBatchClassifier(TinyClassifier):
    """``TinyClassifier`` whose input is NaN at ``nan_step`` on the ranks in ``nan_ranks``.

    At that step it records (per rank) the factors before the K-FAC step (``on_after_backward``),
    and after it, with the gradients the optimizer will see (``on_before_optimizer_step``).
    """

    def __init__(self, nan_step: int, nan_ranks: tuple[int, ...], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nan_step = nan_step
        self.nan_ranks = nan_ranks
        self.observations: dict[str, Any] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        x, y = batch
        if self.global_step == self.nan_step and self.global_rank in self.nan_ranks:
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def _factors(self) -> dict[str, list[torch.Tensor]]:
        pre = self.trainer.strategy.preconditioner
        return {
            name: [f.value.clone() for f in block.factors] for name, block in pre.blocks.items()
        }

    def on_after_backward(self) -> None:
        if self.global_step == self.nan_step:
            self.observations["factors_before"] = self._factors()
            self.observations["raw_finite"] = all(
                bool(torch.isfinite(p.grad).all()) for p in self.parameters()
            )

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        if self.global_step == self.nan_step:
            self.observations["factors_after"] = self._factors()
            self.observations["grads"] = {
                n: p.grad.detach().clone() for n, p in self.named_parameters()
            }


# -- layers unfrozen during fit ------------------------------------------------------------------
class FinetuneClassifier(pl.LightningModule):
    """A backbone (frozen by ``BackboneFinetuning`` until its epoch) and a head."""

    def __init__(self, batch_size: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.Tanh()).double()
        self.head = nn.Linear(HIDDEN, CLASSES).double()
        self.batch_size = batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(64, FEATURES, generator=gen, dtype=torch.float64)
        y = torch.randint(0, CLASSES, (64,), generator=gen)
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size)


# -- recurrent models: the fused nn.LSTM / nn.GRU and a cell called in a loop --------------------
class RecurrentModel(pl.LightningModule):
    """A 2-layer ``nn.LSTM`` language model (``"lstm_lm"``), a bidirectional ``nn.GRU``
    classifier (``"gru_classifier"``) or an ``nn.LSTMCell`` unrolled in a Python loop
    (``"lstm_cell"``), as users write them."""

    def __init__(
        self, kind: str, batch_size: int = 8, lr: float = 0.05, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.embedding = nn.Embedding(VOCAB, WIDTH)
        if kind == "lstm_lm":
            self.rnn = nn.LSTM(WIDTH, WIDTH, num_layers=2, batch_first=True)
        elif kind == "gru_classifier":
            self.rnn = nn.GRU(WIDTH, WIDTH, batch_first=True, bidirectional=True)
        else:
            self.rnn = nn.LSTMCell(WIDTH, WIDTH)
        width = 2 * WIDTH if kind == "gru_classifier" else WIDTH
        self.head = nn.Linear(width, VOCAB)
        self.to(dtype)
        self.batch_size = batch_size
        self.lr = lr

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        if self.kind == "lstm_cell":
            state, outputs = None, []
            for t in range(x.shape[1]):
                state = self.rnn(x[:, t], state)
                outputs.append(state[0])
            return self.head(torch.stack(outputs, dim=1))
        out, last = self.rnn(x)
        if self.kind == "gru_classifier":
            return self.head(torch.cat([last[0], last[1]], dim=-1))  # one label per sequence
        return self.head(out)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, targets = batch
        logits = self(tokens)
        if self.kind == "gru_classifier":
            return F.cross_entropy(logits, targets[:, 0])
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return next_token_loader(self.batch_size)


class MoELanguageModel(pl.LightningModule):
    """An HF mixture-of-experts LM from a small config (``"mixtral"``, ``"qwen2_moe"``), with
    transformers' ``experts_implementation`` (``"eager"`` or ``"grouped_mm"``), float32."""

    def __init__(self, name: str, implementation: str, batch_size: int = 8) -> None:
        super().__init__()
        from tests.hf_models import causal_lm

        self.net = causal_lm(name, VOCAB, 8, implementation)
        self.batch_size = batch_size

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, targets = batch
        logits = self.net(tokens)
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return next_token_loader(self.batch_size)
