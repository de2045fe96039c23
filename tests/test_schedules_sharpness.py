"""The examples' LEGW schedule against its formula; the study's sharpness against a quadratic with a
known Hessian."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from examples.large_batch_study.sharpness import model_sharpness, top_hessian_eigenvalue
from examples.schedules import legw_lr_lambda, legw_peak_lr, legw_warmup_epochs


def test_legw_scaling_rules() -> None:
    assert legw_peak_lr(0.1, 128, 128 * 16) == pytest.approx(0.4)
    assert legw_warmup_epochs(0.5, 128, 128 * 16) == pytest.approx(8.0)


@pytest.mark.parametrize("decay", ["cosine", "polynomial", "constant"])
def test_legw_lambda_shape(decay: str) -> None:
    # batch x4: peak x2; warmup 1 epoch at base -> 4 epochs of 5 steps = 20 warmup steps
    fn = legw_lr_lambda(
        base_batch_size=32,
        batch_size=128,
        base_warmup_epochs=1.0,
        steps_per_epoch=5,
        total_steps=100,
        decay=decay,
    )
    assert fn(0) == pytest.approx(2.0 / 20)
    assert fn(9) == pytest.approx(2.0 * 10 / 20)
    assert fn(20) == pytest.approx(2.0)
    if decay == "constant":
        assert fn(99) == pytest.approx(2.0)
    elif decay == "cosine":
        assert fn(60) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.5)))
        assert fn(100) == pytest.approx(0.0, abs=1e-12)
    else:
        assert fn(60) == pytest.approx(2.0 * 0.5**2)
    # warmup iterations are the same as at the base batch size (k x fewer steps per epoch)
    base = legw_lr_lambda(
        base_batch_size=32,
        batch_size=32,
        base_warmup_epochs=1.0,
        steps_per_epoch=20,
        total_steps=400,
        decay=decay,
    )
    assert base(19) == pytest.approx(1.0) and fn(19) == pytest.approx(2.0)


def test_top_eigenvalue_of_a_quadratic() -> None:
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=gen))
    eigenvalues = torch.tensor([7.5, 3.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    hessian = q @ torch.diag(eigenvalues) @ q.T
    w = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=gen)

    def loss() -> torch.Tensor:
        return 0.5 * w @ hessian @ w + b @ w

    got = top_hessian_eigenvalue(loss, [w], iterations=500, tolerance=1e-12, generator=gen)
    assert got == pytest.approx(7.5, rel=1e-8)


def test_model_sharpness_of_least_squares_equals_dense_hessian() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False).double()
    x = torch.randn(32, 4, dtype=torch.float64)
    y = torch.randn(32, 1, dtype=torch.float64)
    # mean squared error: H = 2 X^T X / N
    expected = float(torch.linalg.eigvalsh(2 * x.T @ x / 32).max())
    got = model_sharpness(
        model,
        [(x[:16], y[:16]), (x[16:], y[16:])],
        nn.functional.mse_loss,
        iterations=500,
        tolerance=1e-12,
    )
    assert got == pytest.approx(expected, rel=1e-8)


def test_sharpness_callback_logs_the_dense_value(tmp_path) -> None:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from examples.large_batch_study.sharpness import SharpnessCallback
    from tests.lightning_support import trainer_kwargs

    x = torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.randn(32, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    class LeastSquares(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 1, bias=False).double()

        def forward(self, inputs):
            return self.net(inputs)

        def training_step(self, batch, batch_idx):
            return nn.functional.mse_loss(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self):
            return DataLoader(TensorDataset(x, y), batch_size=16)

    callback = SharpnessCallback(
        num_batches=2, loss=nn.functional.mse_loss, iterations=300, tolerance=1e-12
    )
    trainer = pl.Trainer(devices=1, callbacks=[callback], **trainer_kwargs(tmp_path, max_epochs=2))
    trainer.fit(LeastSquares())
    expected = float(torch.linalg.eigvalsh(2 * x.T @ x / 32).max())  # the Hessian is constant
    assert [step for step, _ in callback.history] == [2, 4]
    assert callback.history[-1][1] == pytest.approx(expected, rel=1e-6)
    assert float(trainer.callback_metrics["sharpness/top_eigenvalue"]) == pytest.approx(
        expected, rel=1e-6
    )
