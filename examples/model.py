"""The examples' LightningModule: an ordinary classifier with SGD and a LEGW schedule.

Nothing here knows about K-FAC or mixup: both come from the Trainer (strategy and callback).
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from examples.schedules import legw_lr_lambda


def make_network(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A small CNN for images ``[C, H, W]``, an MLP for feature vectors.

    The CNN's head sees a fixed ``32 × 4 × 4`` map (``AdaptiveAvgPool2d(4)``: the identity on
    digits' 4×4 map, a 4×4 average on CIFAR-10's 16×16), so its first linear layer has 513
    inputs with the bias and K-FAC's largest factor is 513 × 513 at any image size. (With 64
    channels and no pooling it was 1,025 × 1,025 on digits, and its eigendecomposition at every
    step was most of K-FAC's time; on CIFAR-10 it would have been 16,385 × 16,385.)
    """
    if len(input_shape) == 3:
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
        nn.Linear(input_shape[0], 128),
        nn.ReLU(inplace=True),
        nn.Linear(128, 128),
        nn.ReLU(inplace=True),
        nn.Linear(128, num_classes),
    )


class Classifier(pl.LightningModule):
    """Cross-entropy classifier; SGD with momentum and the LEGW warmup/decay schedule.

    Args:
        base_lr: Learning rate at ``base_batch_size``; LEGW scales it by ``sqrt(k)``.
        base_batch_size, batch_size: ``k = batch_size / base_batch_size``.
        base_warmup_epochs: Warmup at ``base_batch_size``; LEGW scales it by ``k``.
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
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = make_network(tuple(input_shape), num_classes)
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
