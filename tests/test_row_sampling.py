"""``factor_max_rows``: an unbiased row-sampling estimator of the batch factors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_kfac import KFACPreconditioner
from tests.helpers import assert_close

pytestmark = pytest.mark.usefixtures("float64")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(4, 3, 3, stride=2),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 3),
    )


def factors_after(pre: KFACPreconditioner, model: nn.Module, draws: int) -> dict[str, tuple]:
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 2, 5, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    for _ in range(draws):  # same batch, same weights: only the sampled rows change
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
    return {
        name.removesuffix(".weight"): (layer.a.value.clone(), layer.g.value.clone())
        for name, layer in pre.blocks.items()
    }


def test_cap_above_row_count_is_exact() -> None:
    exact = factors_after(KFACPreconditioner(model := make_model(), kl_clip=None), model, 1)
    capped = factors_after(
        KFACPreconditioner(model := make_model(), kl_clip=None, factor_max_rows=10**6), model, 1
    )
    for name in exact:
        for mine, reference in zip(capped[name], exact[name], strict=True):
            assert torch.equal(mine, reference)


def test_sampled_factors_average_to_exact_factors() -> None:
    """The mean of k sampled estimates converges to the exact factor like 1/sqrt(k) (measured:
    0.46, 0.042, 0.011 relative error at k = 1, 100, 1600); a biased estimator would plateau."""
    exact = factors_after(KFACPreconditioner(model := make_model(), kl_clip=None), model, 1)
    model = make_model()
    # decay k/(k+1) makes the running average the arithmetic mean of all draws
    pre = KFACPreconditioner(
        model, kl_clip=None, factor_max_rows=40, factor_decay=lambda k: k / (k + 1)
    )

    def errors(factors: dict[str, tuple]) -> list[float]:
        return [
            float((f - e).norm() / e.norm()) for f, e in zip(factors["0"], exact["0"], strict=True)
        ]

    single = errors(factors_after(pre, model, 1))
    at_100 = errors(factors_after(pre, model, 99))
    at_1600 = errors(factors_after(pre, model, 1500))
    for one, hundred, many in zip(single, at_100, at_1600, strict=True):
        assert one > 0.1  # one draw of 40 of the 200 rows really is an approximation
        assert hundred / many > 2.5  # 1/sqrt(k): 16x the draws -> 4x smaller error
        assert many < 0.02
    # the second conv (8·4 = 32 rows) and the Linear (8 rows) have fewer rows than the cap
    final = {
        name.removesuffix(".weight"): (layer.a.value, layer.g.value)
        for name, layer in pre.blocks.items()
    }
    for name in ("2", "4"):
        for mine, reference in zip(final[name], exact[name], strict=True):
            assert_close(mine, reference, rtol=1e-9, atol=1e-12)


def test_invalid_cap_is_rejected() -> None:
    with pytest.raises(ValueError, match="factor_max_rows"):
        KFACPreconditioner(make_model(), kl_clip=None, factor_max_rows=0)


class WithExtraUse(nn.Module):
    """``make_model()``'s layers under ``body``, optionally after another sampled use."""

    def __init__(self, extra: bool) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.extra = nn.Conv2d(2, 2, 1) if extra else None
        self.body = make_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.extra is not None:
            x = x + 0.0 * self.extra(x)  # a use discovered before the body's, same output
        return self.body(x)


def test_a_uses_row_sample_does_not_depend_on_the_other_uses() -> None:
    """Each use's sampler is seeded once, from the use's identity: adding another sampled use
    before it (which shifts every discovery and structure index) draws the same rows for it."""
    found = []
    for extra in (False, True):
        model = WithExtraUse(extra)
        pre = KFACPreconditioner(model, kl_clip=None, factor_max_rows=40)
        found.append(factors_after(pre, model, 3)["body.0"])
    for with_extra, without in zip(found[1], found[0], strict=True):
        assert torch.equal(with_extra, without)
