"""The examples' LightningModule: an ordinary classifier with SGD or AdamW and a LEGW schedule.

Nothing here knows about K-FAC or mixup: both come from the Trainer (strategy and callback).
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from examples.schedules import legw_lr_lambda

#: Networks by name (``make_network``): ``"auto"`` picks by the input's shape.
ARCHITECTURES = ("auto", "cnn", "gru", "lstm", "mlp")


class Recurrent(nn.Module):
    """A GRU or LSTM classifier for signals ``[N, C, L]`` (channels first, as the 1-D CNN's).

    The signal is read in ``L / window`` time steps of ``window`` consecutive samples of every
    channel (``C · window`` features per step), as You et al. (2019, LEGW)'s LSTM reads MNIST one
    row of pixels per step; a linear head reads the last hidden state. One recurrent layer;
    K-FAC preconditions its gate projections as linear uses (every time step a weight-sharing
    position, ``lightning_kfac/kfac/kinds/recurrent.py``) and the head as a linear layer.
    """

    def __init__(
        self, cell: str, channels: int, window: int, hidden: int, num_classes: int
    ) -> None:
        super().__init__()
        kinds = {"gru": nn.GRU, "lstm": nn.LSTM}
        self.window = window
        self.rnn = kinds[cell](channels * window, hidden, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, channels, length = x.shape
        steps = x.reshape(n, channels, length // self.window, self.window).permute(0, 2, 1, 3)
        output, _ = self.rnn(steps.reshape(n, length // self.window, channels * self.window))
        return self.head(output[:, -1])


def make_network(
    input_shape: tuple[int, ...],
    num_classes: int,
    arch: str = "auto",
    hidden: int = 64,
    window: int = 4,
) -> nn.Module:
    """A small network for the input's shape.

    - ``cnn`` on images ``[C, H, W]`` (``auto``'s choice): two 3×3 convolutions and an MLP head.
      The head sees a fixed ``32 × 4 × 4`` map (``AdaptiveAvgPool2d(4)``: the identity on
      digits' 4×4 map, a 4×4 average on CIFAR-10's 16×16), so its first linear layer has 513
      inputs with the bias and K-FAC's largest factor is 513 × 513 at any image size. (With 64
      channels and no pooling it was 1,025 × 1,025 on digits, and its eigendecomposition at
      every step was most of K-FAC's time; on CIFAR-10 it would have been 16,385 × 16,385.)
    - ``cnn`` on 1-D signals ``[C, L]`` (``auto``'s choice): MNIST-1D's convolutional baseline
      (Greydanus 2020): three convolutions of 25 channels (kernel 5 then 3, stride 2, padding 1,
      ReLU), flattened into one linear layer (length 40: 25 × 5 = 125 features).
    - ``gru`` / ``lstm`` on 1-D signals: ``Recurrent`` with ``hidden`` units, reading ``window``
      samples per time step (MNIST-1D's 40 samples: 10 steps of 4).
    - ``mlp`` on feature vectors ``[D]`` (``auto``'s choice): two hidden layers of 128.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown network {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    if arch == "auto":
        arch = "cnn" if len(input_shape) in (2, 3) else "mlp"
    if arch in ("gru", "lstm"):
        if len(input_shape) != 2:
            raise ValueError(f"a {arch} classifies sequences [C, T], not inputs {input_shape}")
        if input_shape[1] % window:
            raise ValueError(f"signals of length {input_shape[1]} do not split into {window}s")
        return Recurrent(arch, input_shape[0], window, hidden, num_classes)
    if arch == "cnn" and len(input_shape) == 2:
        channels, length = input_shape
        for kernel in (5, 3, 3):
            length = (length + 2 - kernel) // 2 + 1
        return nn.Sequential(
            nn.Conv1d(channels, 25, 5, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv1d(25, 25, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv1d(25, 25, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Flatten(),
            nn.Linear(25 * length, num_classes),
        )
    if arch == "cnn":
        if len(input_shape) != 3:
            raise ValueError(f"a cnn classifies images or signals, not inputs {input_shape}")
        channels = input_shape[0]
        return nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )
    return nn.Sequential(
        nn.Linear(math.prod(input_shape), 128),
        nn.ReLU(inplace=True),
        nn.Linear(128, 128),
        nn.ReLU(inplace=True),
        nn.Linear(128, num_classes),
    )


#: Optimizers by name (``Classifier(optimizer=...)``).
OPTIMIZERS = ("sgd", "adamw")


class Classifier(pl.LightningModule):
    """Cross-entropy classifier; SGD with momentum (or AdamW) and the LEGW warmup/decay schedule.

    Args:
        base_lr: Learning rate at ``base_batch_size``; LEGW scales it by ``sqrt(k)`` (for AdamW
            too: the square-root rule is also Adam's scaling rule, Malladi et al. 2022).
        base_batch_size, batch_size: ``k = batch_size / base_batch_size``.
        base_warmup_epochs: Warmup at ``base_batch_size``; LEGW scales it by ``k``.
        momentum, weight_decay: SGD's (L2 added to the gradient).
        arch, hidden: The network (``make_network``).
        optimizer: ``"sgd"`` (with ``momentum`` and ``weight_decay``) or ``"adamw"`` (torch's
            defaults: betas (0.9, 0.999), decoupled weight decay ``adamw_weight_decay``).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] = (1, 8, 8),
        num_classes: int = 10,
        base_lr: float = 0.05,
        base_batch_size: int = 32,
        batch_size: int = 32,
        base_warmup_epochs: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        arch: str = "auto",
        hidden: int = 64,
        optimizer: str = "sgd",
        adamw_weight_decay: float = 1e-2,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}: choose one of {OPTIMIZERS}")
        self.save_hyperparameters()
        self.net = make_network(tuple(input_shape), num_classes, arch, hidden)
        self.val_accuracy = torchmetrics.classification.MulticlassAccuracy(
            num_classes, average="micro"
        )
        self.train_accuracy = torchmetrics.classification.MulticlassAccuracy(
            num_classes, average="micro"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_accuracy(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        self.log("train/acc", self.train_accuracy, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_accuracy(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val/acc", self.val_accuracy)

    def configure_optimizers(self):
        h = self.hparams
        optimizer: torch.optim.Optimizer
        if h.get("optimizer", "sgd") == "adamw":
            optimizer = torch.optim.AdamW(
                self.parameters(), lr=h.base_lr, weight_decay=h.adamw_weight_decay
            )
        else:
            optimizer = torch.optim.SGD(
                self.parameters(), lr=h.base_lr, momentum=h.momentum, weight_decay=h.weight_decay
            )
        total = int(self.trainer.estimated_stepping_batches)
        epochs = max(1, self.trainer.max_epochs or 1)
        schedule = legw_lr_lambda(
            base_batch_size=h.base_batch_size,
            batch_size=h.batch_size,
            base_warmup_epochs=h.base_warmup_epochs,
            steps_per_epoch=max(1, total // epochs),
            total_steps=total,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]
