"""K-FAC versus SGD on scikit-learn's bundled digits (real 8x8 images), in plain PyTorch.

    python examples/digits_plain_pytorch.py [--epochs 30] [--batch-size 256]

Trains the same small CNN twice from the same initialisation, once with SGD (momentum) and
once with SGD preconditioned by ``KFACPreconditioner``, prints test accuracy per epoch and ends
with a one-line verdict: which optimizer reached the higher final test accuracy (one seed, one
split: a single comparison, not a benchmark).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from lightning_kfac import KFACPreconditioner


def load_data(seed: int) -> tuple[torch.Tensor, ...]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(inplace=True),
        nn.Linear(64, 10),
    )


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train()
    return correct


def train(method: str, args: argparse.Namespace, data: tuple[torch.Tensor, ...]) -> list[float]:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(args.seed)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    pre = None
    if method == "kfac":
        pre = KFACPreconditioner(
            model, damping=args.damping, optimizer=optimizer, inverse_update_interval=5
        )
    generator = torch.Generator().manual_seed(args.seed)
    history = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for begin in range(0, len(order), args.batch_size):
            index = order[begin : begin + args.batch_size]
            optimizer.zero_grad()
            F.cross_entropy(model(x_train[index]), y_train[index]).backward()
            if pre is not None:
                pre.step()
            optimizer.step()
        history.append(accuracy(model, x_test, y_test))
        print(f"{method:>5} epoch {epoch + 1:3d}  test accuracy {history[-1]:.4f}", flush=True)
    print(f"{method:>5} done in {time.perf_counter() - start:.1f} s")
    return history


def verdict(results: dict[str, list[float]], args: argparse.Namespace, tests: int) -> str:
    """One line: which optimizer ended with the higher test accuracy (a tie within one test
    sample of ``tests``)."""
    sgd, kfac = results["sgd"][-1], results["kfac"][-1]
    setting = f"after {args.epochs} epochs at batch {args.batch_size}, seed {args.seed}"
    if abs(kfac - sgd) < 0.5 / tests:
        return f"verdict: a tie, both {sgd:.4f} test accuracy {setting}"
    winner, loser = ("K-FAC", "SGD") if kfac > sgd else ("SGD", "K-FAC")
    high, low = max(sgd, kfac), min(sgd, kfac)
    return f"verdict: {winner} wins, test accuracy {high:.4f} against {loser}'s {low:.4f} {setting}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--damping", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data = load_data(args.seed)
    results = {method: train(method, args, data) for method in ("sgd", "kfac")}
    print("\nepoch  sgd     kfac")
    for epoch in range(0, args.epochs, max(1, args.epochs // 10)):
        print(f"{epoch + 1:5d}  {results['sgd'][epoch]:.4f}  {results['kfac'][epoch]:.4f}")
    print(verdict(results, args, len(data[3])))


if __name__ == "__main__":
    main()
