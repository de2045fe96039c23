"""Data modules for the examples: scikit-learn digits (default), MNIST-1D, a teacher-student
task, CIFAR-10.

All four are real loaders with no download at run time: digits ship inside scikit-learn,
MNIST-1D and the teacher-student task are generated (MNIST-1D by its own package's generator,
cached on disk), and CIFAR-10 is read from the standard python-version batch files
(``data_batch_1`` ... ``data_batch_5``, ``test_batch``) in a local directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
from pathlib import Path
from typing import Any

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


#: Where generated data sets are cached (``LIGHTNING_KFAC_CACHE`` overrides it).
CACHE_DIR = Path(
    os.environ.get("LIGHTNING_KFAC_CACHE", Path.home() / ".cache" / "lightning-kfac")
).expanduser()
#: MNIST-1D's published split: ``make_dataset(get_dataset_args())`` gives 4,000 training and
#: 1,000 test signals of length 40.
MNIST1D_TRAIN_SAMPLES = 4000


def mnist1d_generation(seed: int, num_samples: int | None = None) -> dict[str, Any]:
    """The ``mnist1d`` package's published default arguments (``get_dataset_args()``), with
    ``seed`` and optionally ``num_samples`` changed: what one generation is asked to do (also
    the cache key). The download ``url`` is dropped: nothing is ever downloaded."""
    from mnist1d.data import get_dataset_args

    args = get_dataset_args(as_dict=True)
    args.pop("url", None)
    args["seed"] = seed
    if num_samples is not None:
        args["num_samples"] = num_samples
    return args


def generate_mnist1d(args: dict[str, Any], cache_dir: Path | None = None) -> dict[str, np.ndarray]:
    """``mnist1d.data.make_dataset`` with ``args`` (see ``mnist1d_generation``), cached.

    Returns ``x`` ``[n_train, 40]`` float64, ``y`` ``[n_train]`` int64, ``x_test``, ``y_test``
    exactly as the package generates them (it standardises each generation by its own mean and
    standard deviation). The arrays are cached in ``cache_dir/mnist1d-<hash of args>.npz``
    (written to a temporary file, then renamed: concurrent ranks never read half a file). The
    generator seeds Python's and NumPy's global random state; both are restored afterwards, so
    generating (or not, on a cache hit) changes no other draw.
    """
    cache_dir = CACHE_DIR if cache_dir is None else Path(cache_dir)
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"mnist1d-{key}.npz"
    if path.exists():
        with np.load(path) as cached:
            return {name: cached[name] for name in ("x", "y", "x_test", "y_test")}
    from mnist1d.data import make_dataset
    from mnist1d.utils import ObjectView

    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(ObjectView(dict(args)))
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    arrays = {name: np.asarray(data[name]) for name in ("x", "y", "x_test", "y_test")}
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(partial, **arrays)
    os.replace(partial, path)
    return arrays


class MNIST1DDataModule(TensorDataModule):
    """MNIST-1D (Greydanus 2020): 10 classes of 1-D signals of length 40, generated offline.

    The test set is always the published one: the 1,000 test signals of
    ``make_dataset(get_dataset_args())`` (seed 42, 5,000 samples, 80/20 split). The training set
    is its 4,000 training signals followed, when ``train_samples`` asks for more, by further
    generations from the same generator and arguments with seeds 43, 44, … (each of
    ``base_samples`` signals, both its parts used for training; the first ``train_samples`` are
    kept). Signals are ``[1, 40]`` (one channel); the usual ``TensorDataModule`` standardisation
    with the training set's mean and std follows.

    Args:
        batch_size: Global batch (or ``"full"``).
        train_samples: Training signals: at least (and by default) the published 4,000, or
            ``0.8 · base_samples``.
        validation: Tune: hold out a fifth of the training set (a fixed seeded choice) as the
            evaluation set instead of the test set (which tuning never sees).
        base_samples: ``num_samples`` of each generation (5,000 as published; smaller for tests).
        cache_dir: Where generated arrays are cached (``CACHE_DIR`` by default).
    """

    num_classes = 10
    input_shape = (1, 40)

    def __init__(
        self,
        batch_size: int | str = 64,
        train_samples: int | None = None,
        validation: bool = False,
        base_samples: int | None = None,
        cache_dir: str | Path | None = None,
        **kwargs,
    ) -> None:
        super().__init__(batch_size, **kwargs)
        published = mnist1d_generation(42)
        self.base_samples = base_samples or published["num_samples"]
        self.first_train = int(self.base_samples * published["train_split"])
        if train_samples is None:
            train_samples = self.first_train
        if train_samples < self.first_train:
            raise ValueError(f"train_samples must be at least {self.first_train}")
        self.train_samples = train_samples
        self.validation = validation
        self.cache_dir = cache_dir

    def generations(self) -> list[dict[str, Any]]:
        """The generator arguments of every generation this data set needs, the published first."""
        extra = math.ceil((self.train_samples - self.first_train) / self.base_samples)
        return [mnist1d_generation(42 + i, self.base_samples) for i in range(1 + extra)]

    def prepare_data(self) -> None:
        """Generate (or find in the cache) every generation; called once before the ranks."""
        for args in self.generations():
            generate_mnist1d(args, self.cache_dir)

    def _tensors(self):
        first, *extra = (generate_mnist1d(args, self.cache_dir) for args in self.generations())
        parts = [first["x"]] + [np.concatenate([e["x"], e["x_test"]]) for e in extra]
        labels = [first["y"]] + [np.concatenate([e["y"], e["y_test"]]) for e in extra]
        x = torch.from_numpy(np.concatenate(parts)[: self.train_samples]).float().unsqueeze(1)
        y = torch.from_numpy(np.concatenate(labels)[: self.train_samples]).long()
        if self.validation:  # tuning never sees the test set
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
            held = order[: len(y) // 5]
            kept = order[len(y) // 5 :]
            return x[kept], y[kept], x[held], y[held]
        x_test = torch.from_numpy(first["x_test"]).float().unsqueeze(1)
        return x, y, x_test, torch.from_numpy(first["y_test"]).long()


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
    train_samples: int | None = None,
) -> TensorDataModule:
    """The data module called ``name``; ``seed`` orders the training data; ``train_samples``
    sizes MNIST-1D's training set (the published 4,000 by default)."""
    if name == "digits":
        return DigitsDataModule(batch_size, validation=validation, seed=seed)
    if name == "mnist1d":
        return MNIST1DDataModule(batch_size, train_samples, validation=validation, seed=seed)
    if name == "teacher":
        return TeacherStudentDataModule(batch_size, seed=seed)
    if name == "cifar10":
        if data_dir is None:
            raise ValueError("--data cifar10 needs --data-dir (the cifar-10-batches-py folder)")
        return CIFAR10DataModule(data_dir, batch_size, seed=seed)
    raise ValueError(f"unknown data set {name!r}: choose digits, mnist1d, teacher or cifar10")
