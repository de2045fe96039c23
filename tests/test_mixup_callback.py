"""MixupCallback on unmodified LightningModules (in-process runs; two ranks through gloo)."""

from __future__ import annotations

import math
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_kfac import KFACDDPStrategy, MixupCallback
from lightning_kfac.mixup import MixedLabels, MixupLossError
from tests.helpers import assert_close
from tests.lightning_support import SaveAfterEpoch, trainer_kwargs

CLASSES, FEATURES, SAMPLES = 4, 6, 48
Pair = namedtuple("Pair", ["inputs", "labels"])


def tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable task: labels from a fixed linear teacher."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, FEATURES, generator=gen)
    teacher = torch.randn(FEATURES, CLASSES, generator=gen)
    return x, (x @ teacher).argmax(1)


class Samples(Dataset):
    def __init__(self, form: str) -> None:
        self.x, self.y = tensors()
        self.form = form

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> Any:
        if self.form == "dict":
            return {"image": self.x[i], "label": self.y[i], "index": i}
        return self.x[i], self.y[i], i


def collate_tuple(items: list) -> tuple:
    x, y, i = zip(*items, strict=True)
    return torch.stack(x), torch.stack(y), torch.tensor(i)


def collate_namedtuple(items: list) -> Pair:
    x, y, _ = collate_tuple(items)
    return Pair(x, y)


class Plain(pl.LightningModule):
    """An ordinary classifier; records what its training_step received."""

    def __init__(
        self, form: str = "list", loss: nn.Module | None = None, batch_size: int = 12
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(FEATURES, 8), nn.Tanh(), nn.Linear(8, CLASSES))
        self.form = form
        self.loss_fn = loss
        self.batch_size = batch_size
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=CLASSES)
        self.records: list[dict[str, Any]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.form == "dict":
            x, y = batch["image"], batch["label"]
        elif self.form == "namedtuple":
            x, y = batch.inputs, batch.labels
        else:
            x, y = batch[0], batch[1]
        logits = self(x)
        loss = self.loss_fn(logits, y) if self.loss_fn is not None else F.cross_entropy(logits, y)
        self.accuracy(logits, y)  # torchmetrics with the same labels
        correct = (logits.argmax(1) == y).float().mean()
        self.log("acc", self.accuracy)
        self.records.append(
            {
                "batch_type": type(batch),
                "x": x.detach().clone(),
                "y": y,
                "loss": loss.detach(),
                "correct": correct,
            }
        )
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader:
        collate = {"tuple": collate_tuple, "namedtuple": collate_namedtuple}.get(self.form)
        return DataLoader(Samples(self.form), batch_size=self.batch_size, collate_fn=collate)


def fit(
    tmp_path: Path, module: pl.LightningModule, callback: MixupCallback, **overrides: Any
) -> pl.Trainer:
    overrides.setdefault("max_steps", 4)
    callbacks = [callback, *overrides.pop("callbacks", [])]
    trainer = pl.Trainer(devices=1, callbacks=callbacks, **trainer_kwargs(tmp_path, **overrides))
    trainer.fit(module)
    return trainer


@pytest.mark.parametrize("form", ["list", "tuple", "namedtuple", "dict"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_exact_mixup_loss_on_every_batch_form(tmp_path: Path, form: str, per_sample: bool) -> None:
    module = Plain(form)
    callback = MixupCallback(
        alpha=0.4, per_sample=per_sample, input_key="image", target_key="label", seed=7
    )
    records_of_mixing = []
    original_mix = callback._mix

    def spy(inputs, targets, use_cutmix):
        out = original_mix(inputs, targets, use_cutmix)
        records_of_mixing.append((inputs.clone(), targets.clone(), dict(callback.last)))
        return out

    callback._mix = spy  # observe what was mixed (the arithmetic is the callback's own)
    fit(tmp_path, module, callback, max_steps=1)
    (record,) = module.records
    (inputs, labels, last) = records_of_mixing[0]
    expected_type = {"list": list, "tuple": tuple, "namedtuple": Pair, "dict": dict}[form]
    assert record["batch_type"] is expected_type
    lam, perm = last["lam"], last["permutation"]
    assert per_sample == (lam.unique().numel() > 1)
    lam32 = lam.float().view(-1, 1)
    assert_close(record["x"], lam32 * inputs + (1 - lam32) * inputs[perm], rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        logits = module(record["x"])  # weights have moved by one step: recompute with the record
    assert isinstance(record["y"], MixedLabels)
    # the loss the unmodified training_step computed is the mixup formula
    torch.manual_seed(0)
    reference = Plain(form)
    with torch.no_grad():
        ref_logits = reference(record["x"])
    expected = (
        lam * F.cross_entropy(ref_logits, labels, reduction="none").double()
        + (1 - lam) * F.cross_entropy(ref_logits, labels[perm], reduction="none").double()
    ).mean()
    assert float(record["loss"]) == pytest.approx(float(expected), rel=1e-5)
    # accuracy against valid integer labels: each sample's dominant label
    dominant = torch.where(lam >= 0.5, labels, labels[perm])
    assert float(record["correct"]) == pytest.approx(
        float((ref_logits.argmax(1) == dominant).float().mean())
    )
    del logits


@pytest.mark.parametrize(
    "loss",
    [
        nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 3.0])),
        nn.CrossEntropyLoss(label_smoothing=0.1),
        nn.CrossEntropyLoss(ignore_index=3),
    ],
)
def test_cross_entropy_module_arguments(tmp_path: Path, loss: nn.Module) -> None:
    module = Plain("list", loss=loss)
    callback = MixupCallback(alpha=0.4, seed=3)
    seen = []
    original_mix = callback._mix
    callback._mix = lambda i, t, c: (seen.append(t.clone()), original_mix(i, t, c))[1]
    fit(tmp_path, module, callback, max_steps=1)
    (record,) = module.records
    lam, perm = callback.last["lam"][0].item(), callback.last["permutation"]
    torch.manual_seed(0)
    reference = Plain("list")
    with torch.no_grad():
        logits = reference(record["x"])
    y = seen[0]
    expected = lam * loss(logits, y) + (1 - lam) * loss(logits, y[perm])
    assert float(record["loss"]) == pytest.approx(float(expected), rel=1e-5)


def test_float_targets_are_mixed_directly(tmp_path: Path) -> None:
    class Soft(Plain):
        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)  # probabilities as targets
            self.records.append({"x": x, "y": y, "loss": loss.detach()})
            return loss

        def train_dataloader(self):
            x, y = tensors()
            return DataLoader(
                list(zip(x, F.one_hot(y, CLASSES).float(), strict=True)), batch_size=12
            )

    module = Soft("list")
    callback = MixupCallback(alpha=0.4, seed=1)
    fit(tmp_path, module, callback, max_steps=1)
    y = module.records[0]["y"]
    assert type(y) is torch.Tensor and y.is_floating_point()
    lam, perm = callback.last["lam"][0].item(), callback.last["permutation"]
    _, labels = tensors()
    onehot = F.one_hot(labels[:12], CLASSES).float()
    assert_close(y, lam * onehot + (1 - lam) * onehot[perm], rtol=1e-6, atol=1e-7)


def test_unsupported_loss_and_batch_raise_clear_errors(tmp_path: Path) -> None:
    module = Plain("list", loss=lambda logits, y: F.nll_loss(F.log_softmax(logits, 1), y))
    with pytest.raises(MixupLossError, match="cannot make nll_loss exact"):
        fit(tmp_path, module, MixupCallback())

    class TensorBatches(Plain):
        def train_dataloader(self):
            return DataLoader(tensors()[0], batch_size=12)

    with pytest.raises(TypeError, match="cannot find inputs and targets"):
        fit(tmp_path, TensorBatches("list"), MixupCallback())
    with pytest.raises(KeyError, match="input_key"):
        fit(tmp_path, Plain("dict"), MixupCallback())  # keys are "image"/"label", not "x"/"y"
    with pytest.raises(ValueError, match="both 0"):
        MixupCallback(alpha=0.0)


def test_cutmix_only_on_images(tmp_path: Path) -> None:
    class Images(Plain):
        def __init__(self):
            super().__init__("list")
            self.net = nn.Sequential(
                nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, CLASSES)
            )

        def train_dataloader(self):
            _x, y = tensors()
            images = torch.randn(SAMPLES, 1, 6, 6, generator=torch.Generator().manual_seed(2))
            return DataLoader(list(zip(images, y, strict=True)), batch_size=12)

    module = Images()
    callback = MixupCallback(alpha=0.0, cutmix_alpha=1.0, seed=4)
    fit(tmp_path, module, callback, max_steps=1)
    assert callback.last["cutmix"]
    lam = callback.last["lam"]
    assert isinstance(module.records[0]["y"], MixedLabels)
    assert_close(module.records[0]["y"].lam, lam)


def test_off_schedule_for_final_epochs(tmp_path: Path) -> None:
    module = Plain("list")  # 48 samples / 12 = 4 steps per epoch
    callback = MixupCallback(alpha=0.4, off_last_epochs=1, seed=0)
    fit(tmp_path, module, callback, max_steps=-1, max_epochs=3)
    mixed = [isinstance(r["y"], MixedLabels) for r in module.records]
    assert mixed == [True] * 8 + [False] * 4
    module = Plain("list")
    fit(tmp_path, module, MixupCallback(alpha=0.4, off_last_steps=3, seed=0), max_steps=6)
    assert [isinstance(r["y"], MixedLabels) for r in module.records] == [True] * 3 + [False] * 3


def test_resume_reproduces_the_lambda_sequence(tmp_path: Path) -> None:
    def lambdas(module: Plain) -> list[float]:
        return [float(r["y"].lam[0]) for r in module.records]

    full = Plain("list")
    fit(
        tmp_path,
        full,
        MixupCallback(seed=11),
        max_steps=-1,
        max_epochs=2,
        callbacks=[SaveAfterEpoch(tmp_path / "e0.ckpt", 0)],
    )
    resumed = Plain("list")
    trainer = pl.Trainer(
        devices=1, callbacks=[MixupCallback(seed=11)], **trainer_kwargs(tmp_path, max_epochs=2)
    )
    trainer.fit(resumed, ckpt_path=tmp_path / "e0.ckpt")
    assert len(lambdas(resumed)) == 4
    assert lambdas(resumed) == lambdas(full)[4:]
    fresh = Plain("list")
    fit(tmp_path, fresh, MixupCallback(seed=11), max_steps=4)
    assert lambdas(fresh) != lambdas(full)[4:]  # the resumed sequence came from the checkpoint


class RecordPermutation(pl.Callback):
    def __init__(self, mixup: MixupCallback, directory: Path) -> None:
        self.mixup, self.directory = mixup, directory

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.save(self.mixup.last, self.directory / f"rank{trainer.global_rank}.pt")


def test_two_ranks_draw_different_permutations_and_train_with_kfac(tmp_path: Path) -> None:
    mixup = MixupCallback(alpha=0.4, per_sample=True, seed=5)
    module = Plain("list")
    trainer = pl.Trainer(
        strategy=KFACDDPStrategy(start_method="fork", kl_clip=1e-2),
        devices=2,
        callbacks=[mixup, RecordPermutation(mixup, tmp_path)],
        **trainer_kwargs(tmp_path, max_steps=6),
    )
    trainer.fit(module)
    zero, one = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert zero["applied"] and one["applied"]
    assert not torch.equal(zero["permutation"], one["permutation"])
    assert not torch.equal(zero["lam"], one["lam"])


def test_kfac_factors_come_from_the_mixed_inputs(tmp_path: Path) -> None:
    module = Plain("list")
    mixup = MixupCallback(alpha=0.4, seed=2)
    strategy = KFACDDPStrategy(start_method="popen", kl_clip=None)
    fit(tmp_path, module, mixup, max_steps=1, strategy=strategy)
    x = module.records[0]["x"].double()
    rows = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    A = strategy.preconditioner.block("net.0.weight").a.value[0].double()
    assert_close(A, rows.T @ rows / x.shape[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cutmix", [False, True])
def test_running_mixup_mixes_with_the_previous_mixed_batch(tmp_path: Path, cutmix: bool) -> None:
    class Images(Plain):
        def __init__(self) -> None:
            super().__init__("list")
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(FEATURES, CLASSES))

        def train_dataloader(self):
            x, y = tensors()
            return DataLoader(list(zip(x.view(-1, 1, 2, 3), y, strict=True)), batch_size=12)

    module = Images()
    options = dict(alpha=0.0, cutmix_alpha=1.0) if cutmix else dict(alpha=0.4)
    mixup = MixupCallback(running=True, seed=9, **options)
    lams = []
    original = mixup._mix
    mixup._mix = lambda i, t, c: (lambda out: (lams.append(mixup.last), out)[1])(original(i, t, c))
    fit(tmp_path, module, mixup, max_steps=2)
    first, second = module.records
    x_all, y_all = tensors()
    x1, x2 = x_all[:12].view(-1, 1, 2, 3), x_all[12:24].view(-1, 1, 2, 3)
    y1, y2 = y_all[:12], y_all[12:24]
    assert not lams[0]["running"] and lams[1]["running"]
    lam1, lam2 = lams[0]["lam"], lams[1]["lam"]
    assert bool((lam2 >= 0.5).all())  # running mixup keeps the new batch dominant
    if not cutmix:
        perm = lams[0]["permutation"]
        expected_x1 = (
            lam1.float().view(-1, 1, 1, 1) * x1 + (1 - lam1.float().view(-1, 1, 1, 1)) * x1[perm]
        )
        assert_close(first["x"], expected_x1, rtol=1e-6, atol=1e-6)
        w2 = lam2.float().view(-1, 1, 1, 1)
        assert_close(second["x"], w2 * x2 + (1 - w2) * first["x"], rtol=1e-6, atol=1e-6)
    else:
        taken = second["x"] != x2  # pixels pasted from the previous mixed batch
        assert_close(second["x"][taken], first["x"][taken])
    # the loss mixes the new labels with the previous batch's soft targets
    onehot = F.one_hot(y1, CLASSES).double()
    perm1 = lams[0]["permutation"]
    soft1 = lam1.view(-1, 1) * onehot + (1 - lam1.view(-1, 1)) * onehot[perm1]
    target2 = lam2.view(-1, 1) * F.one_hot(y2, CLASSES).double() + (1 - lam2.view(-1, 1)) * soft1
    y = second["y"]
    assert isinstance(y, MixedLabels) and y.soft_partner is not None
    assert_close(y.soft_partner.double(), soft1, rtol=1e-6, atol=1e-7)
    logits = torch.randn(
        12, CLASSES, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    assert_close(F.cross_entropy(logits, y), F.cross_entropy(logits, target2), rtol=1e-6, atol=1e-8)


def test_callback_label_smoothing_and_logged_statistics(tmp_path: Path) -> None:
    module = Plain("list")
    callback = MixupCallback(alpha=0.4, label_smoothing=0.1, seed=3)
    trainer = fit(tmp_path, module, callback, max_steps=1)
    (record,) = module.records
    lam, perm = callback.last["lam"][0].item(), callback.last["permutation"]
    torch.manual_seed(0)
    with torch.no_grad():
        logits = Plain("list")(record["x"])
    _, labels = tensors()
    y = labels[:12]
    expected = lam * F.cross_entropy(logits, y, label_smoothing=0.1) + (1 - lam) * F.cross_entropy(
        logits, y[perm], label_smoothing=0.1
    )
    assert float(record["loss"]) == pytest.approx(float(expected), rel=1e-5)
    metrics = trainer.callback_metrics
    assert float(metrics["mixup/lambda_mean"]) == pytest.approx(lam, rel=1e-6)
    assert float(metrics["mixup/applied"]) == 1.0 and float(metrics["mixup/cutmix"]) == 0.0


def test_only_training_is_mixed(tmp_path: Path) -> None:
    class WithValidation(Plain):
        def validation_step(self, batch, batch_idx):
            self.records.append({"stage": "val", "y": batch[1], "x": batch[0]})

        def val_dataloader(self):
            return self.train_dataloader()

    module = WithValidation("list")
    fit(
        tmp_path,
        module,
        MixupCallback(seed=0),
        max_steps=2,
        limit_val_batches=2,
        val_check_interval=1,
    )
    validation = [r for r in module.records if r.get("stage") == "val"]
    training = [r for r in module.records if r.get("stage") != "val"]
    assert validation and training
    assert all(type(r["y"]) is torch.Tensor for r in validation)
    x, _ = tensors()
    assert torch.equal(validation[0]["x"], x[:12])  # unmixed inputs
    assert all(isinstance(r["y"], MixedLabels) for r in training)
    assert "training_step" not in vars(module)  # the wrapper is removed after fit


def test_kfac_with_mixup_trains(tmp_path: Path) -> None:
    class LossPerEpoch(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            losses = [float(r["loss"]) for r in pl_module.records]
            if trainer.global_rank == 0:
                torch.save(losses, tmp_path / "losses.pt")

    trainer = pl.Trainer(
        strategy=KFACDDPStrategy(start_method="fork", kl_clip=1e-2, damping=1e-2),
        devices=2,
        callbacks=[MixupCallback(alpha=0.4, seed=1), LossPerEpoch()],
        **trainer_kwargs(tmp_path, max_epochs=15),
    )
    trainer.fit(Plain("list"))  # 48 samples, 2 ranks x 12: 2 steps per epoch
    losses = torch.tensor(torch.load(tmp_path / "losses.pt"))
    assert losses.numel() == 30 and bool(torch.isfinite(losses).all())
    assert float(losses[-6:].mean()) < 0.7 * float(losses[:6].mean())


# -- nothing silent ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (dict(alpha=math.nan), ValueError, r"alpha=nan\): alpha must be finite; λ ~ Beta"),
        (dict(alpha=math.inf), ValueError, r"alpha=inf\): alpha must be finite"),
        (dict(alpha=10**400), ValueError, r"alpha must be finite"),
        (dict(alpha=-0.4), ValueError, r"alpha=-0.4\): λ ~ Beta\(alpha, alpha\) needs a finite"),
        (dict(alpha="0.4"), TypeError, r"alpha must be a real number"),
        (dict(alpha=True), TypeError, r"alpha must be a real number"),
        (dict(cutmix_alpha=math.nan), ValueError, r"cutmix_alpha=nan\): cutmix_alpha must be"),
        (dict(cutmix_alpha=-1.0), ValueError, r"0 switches CutMix off"),
        (dict(alpha=0.0), ValueError, r"both 0: nothing to mix"),
        (dict(prob=1.5), ValueError, r"prob=1.5\): prob must be in \[0, 1\]"),
        (dict(prob=math.nan), ValueError, r"prob=nan\): prob must be finite"),
        (dict(switch_prob=-0.1), ValueError, r"switch_prob must be in \[0, 1\]"),
        (dict(label_smoothing=1.0), ValueError, r"label_smoothing must be in \[0, 1\)"),
        (dict(label_smoothing=math.nan), ValueError, r"label_smoothing must be finite"),
        (dict(off_last_epochs=-1), ValueError, r"off_last_epochs must be a whole number >= 0"),
        (dict(off_last_epochs=2.5), ValueError, r"off_last_epochs must be a whole number"),
        (dict(off_last_steps=-3), ValueError, r"off_last_steps must be a whole number >= 0"),
        (dict(input_index=1), ValueError, r"must be different batch elements"),
        (dict(target_index=1.0), TypeError, r"target_index must be an int"),
        (dict(input_key="y"), ValueError, r"must be different batch entries"),
        (dict(seed=1.5), TypeError, r"seed must be an int or None"),
    ],
)
def test_constructor_validates_every_numeric_option(options: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        MixupCallback(**options)


def test_valid_extremes_are_accepted() -> None:
    MixupCallback(alpha=0.0, cutmix_alpha=1.0)  # CutMix only
    MixupCallback(alpha=1e-300, prob=0.0, switch_prob=1.0, label_smoothing=0.0, seed=-1)
    MixupCallback(alpha=1e300, seed=2**70, off_last_epochs=0, off_last_steps=10)


class Tokens(Plain):
    """A text classifier on token ids: an embedding, mean-pooled."""

    def __init__(self) -> None:
        super().__init__("list")
        self.net = nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(8 * 5, CLASSES))

    def train_dataloader(self) -> DataLoader:
        tokens = torch.randint(0, 20, (SAMPLES, 5), generator=torch.Generator().manual_seed(0))
        return DataLoader(list(zip(tokens, tensors()[1], strict=True)), batch_size=12)


def test_token_id_inputs_raise_at_the_first_batch(tmp_path: Path) -> None:
    module = Tokens()
    with pytest.raises(TypeError, match=r"mixup mixes float inputs, got torch.int64.*embeddings"):
        fit(tmp_path, module, MixupCallback(alpha=0.4, prob=0.5, seed=0))
    assert module.records == []  # never silently swapped samples: no step ran


def test_cutmix_only_accepts_integer_images_and_copies_pixels(tmp_path: Path) -> None:
    class Bytes(Plain):
        def __init__(self) -> None:
            super().__init__("list")
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(36, CLASSES))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.float() / 255)

        def train_dataloader(self) -> DataLoader:
            images = torch.randint(0, 256, (SAMPLES, 1, 6, 6), dtype=torch.uint8)
            return DataLoader(list(zip(images, tensors()[1], strict=True)), batch_size=12)

    module = Bytes()
    seen = []
    callback = MixupCallback(alpha=0.0, cutmix_alpha=1.0, seed=4)
    original = callback._mix
    callback._mix = lambda i, t, c: (seen.append(i.clone()), original(i, t, c))[1]
    fit(tmp_path, module, callback, max_steps=1)
    x, mixed = seen[0], module.records[0]["x"]
    assert mixed.dtype == torch.uint8
    partner = x[callback.last["permutation"]]
    assert bool(((mixed == x) | (mixed == partner)).all())  # every pixel copied, none blended
    kept = (mixed == x).flatten(1).double().mean(1)
    assert bool((kept >= callback.last["lam"] - 1e-12).all())


@pytest.mark.parametrize("alpha", [1e-300, 1e-30, 1e6])
def test_extreme_alphas_train_with_finite_lambda(tmp_path: Path, alpha: float) -> None:
    module = Plain("list")
    callback = MixupCallback(alpha=alpha, per_sample=True, seed=6)
    lams = []
    original = callback._mix
    callback._mix = lambda i, t, c: (lambda out: (lams.append(out[2]), out)[1])(original(i, t, c))
    fit(tmp_path, module, callback, max_steps=3)
    lam = torch.cat(lams)
    assert lam.numel() == 36 and not bool(torch.isnan(lam).any())
    if alpha < 1:
        assert bool(((lam == 0) | (lam == 1)).all()) and 0 < float(lam.mean()) < 1
    else:
        assert float((lam - 0.5).abs().max()) < 0.01
    assert all(bool(torch.isfinite(r["loss"])) for r in module.records)


LABEL_LOSSES = {
    "F.cross_entropy(logits, y.view(-1))": lambda logits, y: F.cross_entropy(logits, y.view(-1)),
    "nn.CrossEntropyLoss()(logits, y.long())": lambda logits, y: nn.CrossEntropyLoss()(
        logits, y.long()
    ),
    "F.cross_entropy(logits, y.to(logits.device).reshape(-1))": lambda logits, y: F.cross_entropy(
        logits, y.to(logits.device).reshape(-1)
    ),
    "F.cross_entropy(logits.view(-1, C), y.view(-1, 1).view(-1))": lambda logits, y: (
        F.cross_entropy(logits.view(-1, CLASSES), y.view(-1, 1).view(-1))
    ),
}


@pytest.mark.parametrize("loss", LABEL_LOSSES.values(), ids=LABEL_LOSSES.keys())
def test_flattening_training_steps_get_the_exact_mixed_loss(tmp_path: Path, loss) -> None:
    module = Plain("list", loss=loss)
    callback = MixupCallback(alpha=0.4, per_sample=True, seed=3)
    fit(tmp_path, module, callback, max_steps=1)
    (record,) = module.records
    lam, perm = callback.last["lam"], callback.last["permutation"]
    torch.manual_seed(0)
    with torch.no_grad():
        logits = Plain("list")(record["x"]).double()
    y = tensors()[1][:12]
    expected = (
        lam * F.cross_entropy(logits, y, reduction="none")
        + (1 - lam) * F.cross_entropy(logits, y[perm], reduction="none")
    ).mean()
    assert float(record["loss"]) == pytest.approx(float(expected), rel=1e-5)
    dominant = torch.where(lam >= 0.5, y, y[perm])
    assert float(record["correct"]) == pytest.approx(
        float((logits.argmax(1) == dominant).float().mean())
    )


def test_sequence_labels_with_hugging_face_flattening(tmp_path: Path) -> None:
    """Float token features [N, T, D], labels [N, T] with ignore_index: λ_i over all T tokens."""
    steps, vocab = 5, 7

    class Tagger(Plain):
        def __init__(self) -> None:
            super().__init__("list")
            torch.manual_seed(0)
            self.net = nn.Linear(FEATURES, vocab)
            self.accuracy = torchmetrics.classification.MulticlassAccuracy(
                num_classes=vocab, ignore_index=-100
            )

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, labels = batch
            logits = self(x)  # [N, T, V]
            loss = F.cross_entropy(logits.view(-1, vocab), labels.view(-1))
            self.accuracy(logits.view(-1, vocab), labels.view(-1))
            self.records.append({"x": x.detach().clone(), "y": labels, "loss": loss.detach()})
            return loss

        def train_dataloader(self) -> DataLoader:
            gen = torch.Generator().manual_seed(5)
            x = torch.randn(SAMPLES, steps, FEATURES, generator=gen)
            labels = torch.randint(0, vocab, (SAMPLES, steps), generator=gen)
            labels[::3, 3:] = -100  # padding
            return DataLoader(list(zip(x, labels, strict=True)), batch_size=12)

    module = Tagger()
    callback = MixupCallback(alpha=0.4, per_sample=True, seed=8)
    fit(tmp_path, module, callback, max_steps=1)
    (record,) = module.records
    lam, perm = callback.last["lam"], callback.last["permutation"]
    y_a = torch.stack([module.train_dataloader().dataset[i][1] for i in range(12)])
    y_b = y_a[perm]
    assert isinstance(record["y"], MixedLabels) and record["y"].lam.shape == (12, steps)
    torch.manual_seed(0)
    with torch.no_grad():
        log_p = Tagger()(record["x"]).double().log_softmax(-1)  # [N, T, V]
    numerator, denominator = 0.0, 0.0
    for i in range(12):
        for t in range(steps):
            for weight, label in ((lam[i], y_a[i, t]), (1 - lam[i], y_b[i, t])):
                if label != -100:
                    numerator -= float(weight * log_p[i, t, label])
                    denominator += float(weight)
    assert float(record["loss"]) == pytest.approx(numerator / denominator, rel=1e-5)


@pytest.mark.parametrize("one_hot", [False, True])
def test_cutmix_dense_labels_follow_the_pasted_pixels(tmp_path: Path, one_hot: bool) -> None:
    """Segmentation under CutMix: each pixel's label is the label of the image it came from, for
    integer maps [N, H, W] and for float (one-hot) maps [N, C, H, W]."""

    class Segmenter(Plain):
        def __init__(self) -> None:
            super().__init__("list")
            torch.manual_seed(0)
            self.net = nn.Conv2d(1, CLASSES, 3, padding=1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, labels = batch
            loss = F.cross_entropy(self(x), labels)
            self.records.append({"x": x.detach().clone(), "y": labels, "loss": loss.detach()})
            return loss

        def train_dataloader(self) -> DataLoader:
            gen = torch.Generator().manual_seed(6)
            images = torch.randn(SAMPLES, 1, 6, 6, generator=gen)
            maps = torch.randint(0, CLASSES, (SAMPLES, 6, 6), generator=gen)
            if one_hot:
                maps = F.one_hot(maps, CLASSES).permute(0, 3, 1, 2).float()
            return DataLoader(list(zip(images, maps, strict=True)), batch_size=12)

    module = Segmenter()
    callback = MixupCallback(alpha=0.0, cutmix_alpha=1.0, seed=2)
    seen = []
    original = callback._mix
    callback._mix = lambda i, t, c: (seen.append((i.clone(), t.clone())), original(i, t, c))[1]
    fit(tmp_path, module, callback, max_steps=1)
    (x, maps), record = seen[0], module.records[0]
    perm = callback.last["permutation"]
    from_partner = (record["x"] != x)[:, 0]  # pixels pasted from the partner
    assert bool(from_partner.any()) and not bool(from_partner.all())
    if one_hot:
        maps = maps.argmax(1)
        pasted = torch.where(from_partner, maps[perm], maps)
        expected = F.one_hot(pasted, CLASSES).permute(0, 3, 1, 2).float()
        assert type(record["y"]) is torch.Tensor and torch.equal(record["y"], expected)
    else:
        pasted = torch.where(from_partner, maps[perm], maps)
        assert torch.equal(record["y"].dominant(), pasted)
    torch.manual_seed(0)
    with torch.no_grad():
        logits = Segmenter()(record["x"]).double()
    assert float(record["loss"]) == pytest.approx(float(F.cross_entropy(logits, pasted)), rel=1e-5)


def test_batches_mixup_cannot_handle_raise_at_the_first_batch(tmp_path: Path) -> None:
    class Maps(Plain):
        def train_dataloader(self) -> DataLoader:
            images = torch.randn(SAMPLES, 1, 6, 6)
            maps = torch.randint(0, CLASSES, (SAMPLES, 3, 3))  # not the images' 6 x 6
            return DataLoader(list(zip(images, maps, strict=True)), batch_size=12)

    module = Maps()
    with pytest.raises(ValueError, match=r"dense targets must be \[N, H, W\] with the images'"):
        fit(tmp_path, module, MixupCallback(alpha=0.4, cutmix_alpha=1.0, prob=0.5))
    with pytest.raises(ValueError, match=r"running=True\) .* needs one integer label per"):
        fit(tmp_path, module, MixupCallback(alpha=0.4, running=True))
    with pytest.raises(ValueError, match=r"CutMix \(cutmix_alpha > 0\) needs image batches"):
        fit(tmp_path, Plain("list"), MixupCallback(alpha=0.4, cutmix_alpha=1.0, switch_prob=0.1))
    assert module.records == []


def test_a_loss_on_labels_that_lost_their_mix_raises_in_training(tmp_path: Path) -> None:
    def hand_written(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -(logits.log_softmax(1) * F.one_hot(y, CLASSES)).sum(1).mean()

    with pytest.raises(MixupLossError, match=r"Tensor.mul combines labels that lost their mix in"):
        fit(tmp_path, Plain("list", loss=hand_written), MixupCallback(seed=0))
