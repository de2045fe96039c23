"""Data modules for the examples: scikit-learn digits (default), a teacher-student task, CIFAR-10.

All three are real loaders with no download at run time: digits ship inside scikit-learn,
the teacher-student task is generated, and CIFAR-10 is read from the standard python-version
batch files (``data_batch_1`` ... ``data_batch_5``, ``test_batch``) in a local directory.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

#: ``batch_size`` value meaning "the whole training set in every step" (full-batch training).
FULL_BATCH = "full"
CIFAR10_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST_FILE = "test_batch"


class TensorDataModule(pl.LightningDataModule):
    """Train/test tensors in memory; ``batch_size`` is the *global* batch, split over ranks.

    Args:
        batch_size: Global batch in samples, or ``"full"`` for the whole training set per step.
        eval_batch_size: Per-rank batch of the evaluation loaders.
        seed: Seeds the training order: every rank draws its share of one permutation per epoch
            from ``DistributedSampler(seed=seed)`` (reshuffled by epoch), so the order does not
            depend on any global random state.

    With ``"full"`` and ``R`` ranks each rank gets ``ceil(n / R)`` samples per step; when ``R``
    does not divide ``n`` the sampler repeats ``R·ceil(n / R) − n`` samples (one for digits on two
    ranks). Otherwise every epoch drops the last incomplete batch of each rank.
    """

    num_classes: int
    input_shape: tuple[int, ...]

    def __init__(
        self, batch_size: int | str = 64, eval_batch_size: int = 512, seed: int = 0
    ) -> None:
        super().__init__()
        if batch_size != FULL_BATCH and int(batch_size) <= 0:
            raise ValueError(f"batch_size must be positive or {FULL_BATCH!r}, got {batch_size!r}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            x_train, y_train, x_test, y_test = self._tensors()
            mean, std = x_train.mean(), x_train.std()
            self.train_set = TensorDataset((x_train - mean) / std, y_train)
            self.test_set = TensorDataset((x_test - mean) / std, y_test)

    @property
    def full_batch(self) -> bool:
        return self.batch_size == FULL_BATCH

    def global_batch_size(self) -> int:
        """The global batch in samples (loads the data for ``"full"``)."""
        if not self.full_batch:
            return int(self.batch_size)
        self.setup()
        assert self.train_set is not None
        return len(self.train_set)

    def _world(self) -> tuple[int, int]:
        """``(world size, global rank)`` of the attached trainer; ``(1, 0)`` without one."""
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank

    def _per_rank(self, size: int, world: int) -> int:
        if self.full_batch:
            return math.ceil(size / world)
        if size % world:
            raise ValueError(f"batch size {size} is not divisible by the {world} ranks")
        return size // world

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        world, rank = self._world()
        sampler = DistributedSampler(
            self.train_set, num_replicas=world, rank=rank, shuffle=True, seed=self.seed
        )
        return DataLoader(
            self.train_set,
            batch_size=self._per_rank(self.global_batch_size(), world),
            sampler=sampler,
            drop_last=not self.full_batch,
        )

    def val_dataloader(self) -> DataLoader:
        assert self.test_set is not None
        return DataLoader(self.test_set, batch_size=self.eval_batch_size)

    test_dataloader = val_dataloader


class DigitsDataModule(TensorDataModule):
    """scikit-learn's bundled digits: 1,797 real 8x8 grey images of 10 digits; 75/25 split."""

    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(
        self, batch_size: int | str = 64, split_seed: int = 0, validation: bool = False, **kwargs
    ) -> None:
        super().__init__(batch_size, **kwargs)
        self.split_seed = split_seed
        #: Evaluate on a held-out fifth of the *training* set (for tuning) instead of the test set.
        self.validation = validation

    def _tensors(self):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)
        y = torch.tensor(digits.target, dtype=torch.int64)
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=0.25, random_state=self.split_seed, stratify=y
        )
        if self.validation:  # tuning never sees the test set
            x_train, x_test, y_train, y_test = train_test_split(
                x_train, y_train, test_size=0.2, random_state=self.split_seed, stratify=y_train
            )
        return x_train, y_train, x_test, y_test


class TeacherStudentDataModule(TensorDataModule):
    """Gaussian inputs labelled by a fixed random two-layer teacher network (10 classes)."""

    num_classes = 10

    def __init__(
        self,
        batch_size: int | str = 64,
        features: int = 32,
        samples: int = 4096,
        teacher_seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(batch_size, **kwargs)
        self.features, self.samples, self.teacher_seed = features, samples, teacher_seed
        self.input_shape = (features,)

    def _tensors(self):
        gen = torch.Generator().manual_seed(self.teacher_seed)
        x = torch.randn(self.samples, self.features, generator=gen)
        hidden = torch.tanh(x @ torch.randn(self.features, 64, generator=gen) / self.features**0.5)
        y = (hidden @ torch.randn(64, self.num_classes, generator=gen)).argmax(1)
        cut = int(0.8 * self.samples)
        return x[:cut], y[:cut], x[cut:], y[cut:]


def load_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python-version batch file -> images ``[N, 3, 32, 32]`` uint8, labels ``[N]``."""
    with open(path, "rb") as handle:
        batch = pickle.load(handle, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    return data, labels


class CIFAR10DataModule(TensorDataModule):
    """CIFAR-10 from ``data_dir`` holding the python-version files (``cifar-10-batches-py``)."""

    num_classes = 10
    input_shape = (3, 32, 32)

    def __init__(self, data_dir: str | Path, batch_size: int | str = 128, **kwargs) -> None:
        super().__init__(batch_size, **kwargs)
        self.data_dir = Path(data_dir)

    def _tensors(self):
        missing = [
            n for n in [*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE] if not (self.data_dir / n).exists()
        ]
        if missing:
            raise FileNotFoundError(
                f"CIFAR-10 files {missing} not found in {self.data_dir}: point --data-dir at the "
                "extracted 'cifar-10-batches-py' folder (nothing is downloaded)"
            )
        parts = [load_cifar10_batch(self.data_dir / n) for n in CIFAR10_TRAIN_FILES]
        x_train = torch.from_numpy(np.concatenate([p[0] for p in parts])).float() / 255
        y_train = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        x_test, y_test = load_cifar10_batch(self.data_dir / CIFAR10_TEST_FILE)
        return x_train, y_train, torch.from_numpy(x_test).float() / 255, torch.from_numpy(y_test)


def make_datamodule(
    name: str,
    batch_size: int | str,
    data_dir: str | None = None,
    validation: bool = False,
    seed: int = 0,
) -> TensorDataModule:
    """The data module called ``name``; ``seed`` orders the training data."""
    if name == "digits":
        return DigitsDataModule(batch_size, validation=validation, seed=seed)
    if name == "teacher":
        return TeacherStudentDataModule(batch_size, seed=seed)
    if name == "cifar10":
        if data_dir is None:
            raise ValueError("--data cifar10 needs --data-dir (the cifar-10-batches-py folder)")
        return CIFAR10DataModule(data_dir, batch_size, seed=seed)
    raise ValueError(f"unknown data set {name!r}: choose digits, teacher or cifar10")
