"""The study's claims, each with its test declared before any run.

A claim names two points of the study — ``(model, method, batch)``, the batch as the
benchmark's ``"small"`` or ``"large"`` one — and the test that decides it. The list is fixed by
the benchmark and the models alone (``declare``), written to ``study.json`` and summarised in the
console's header before the first run; the verdicts are computed from the numbers afterwards
(``evaluate``), never chosen after seeing them. Three tests:

- ``accuracy`` (the claim: ``a``'s mean test accuracy is above ``b``'s): the difference of the
  means over seeds against its standard error ``sqrt(s_a²/n_a + s_b²/n_b)``. **agrees** when
  ``(m_a − m_b) / SE > THRESHOLD``, **disagrees** when ``< −THRESHOLD``, else **within noise**.
- ``not_below`` (the claim: ``a`` closes the gap to ``b``, its accuracy is not below ``b``'s):
  **disagrees** when ``a`` is more than ``THRESHOLD`` standard errors below ``b``, **agrees**
  otherwise (the table shows the difference and its standard error next to the verdict).
- ``sharpness`` (``a``'s minimum is flatter than ``b``'s): the top Hessian eigenvalues at the
  lowest training loss that every run of both points reached; **agrees** when every run of
  ``a`` lies below every run of ``b``, **disagrees** when every run lies above, else **within
  noise**, **not measured** when no common loss level was reached.
- ``time`` (``a`` reaches the target test accuracy in less training time than ``b``): by
  non-overlap of the runs' training seconds to the target, a run that never reaches it counting
  as slower than any that does; **agrees** / **disagrees** / **within noise** as for sharpness,
  **not measured** when no run of either reaches the target. Seconds depend on the machine and
  its load, so this verdict is the one a busy machine can change; the steps to the target are
  in the same table and do not.

``THRESHOLD = 3`` standard errors: with about twenty accuracy claims, 2 would let one false
"agrees" in every few studies through, and a verdict near the threshold flips on another CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

#: Accuracy claims count when the difference of means is this many standard errors.
THRESHOLD = 3.0
TESTS = ("accuracy", "not_below", "sharpness", "time")

Point = dict[str, Any]


@dataclass(frozen=True)
class Claim:
    """One claim: ``a`` against ``b`` by ``test``; ``a`` and ``b`` are ``(method, batch role)``
    of ``model`` (the role is ``"small"`` or ``"large"``)."""

    id: str
    source: str
    statement: str
    test: str
    model: str
    a: tuple[str, str]
    b: tuple[str, str]

    def declared(self) -> dict[str, Any]:
        rule = {
            "accuracy": f"difference of mean test accuracies > {THRESHOLD:g} standard errors",
            "not_below": f"not more than {THRESHOLD:g} standard errors below",
            "sharpness": "every run's top Hessian eigenvalue below every run of the other, at "
            "the lowest training loss both reached",
            "time": "every run reaches the target faster than every run of the other",
        }[self.test]
        return {**asdict(self), "rule": rule}


#: The claims per model: (id, source, statement, test, a, b).
CLAIMS: tuple[tuple[str, str, str, str, tuple[str, str], tuple[str, str]], ...] = (
    (
        "sgd_gap",
        "Keskar et al. 2017; You et al. 2019 (LEGW)",
        "SGD's test accuracy at the large batch is below that at the small batch (the gap)",
        "accuracy",
        ("sgd", "small"),
        ("sgd", "large"),
    ),
    (
        "sgd_sharper",
        "Keskar et al. 2017",
        "SGD's minimum is sharper at the large batch (matched training loss)",
        "sharpness",
        ("sgd", "small"),
        ("sgd", "large"),
    ),
    (
        "kfac_beats_sgd",
        "Osawa et al. 2019",
        "K-FAC beats SGD at the large batch",
        "accuracy",
        ("kfac", "large"),
        ("sgd", "large"),
    ),
    (
        "kfac_faster",
        "Osawa et al. 2019",
        "K-FAC reaches the target accuracy in less training time than SGD at the large batch",
        "time",
        ("kfac", "large"),
        ("sgd", "large"),
    ),
    (
        "kfac_beats_adamw",
        "this study (AdamW: what many users would pick instead)",
        "K-FAC beats AdamW at the large batch",
        "accuracy",
        ("kfac", "large"),
        ("adamw", "large"),
    ),
    (
        "mixup_raises_kfac",
        "Naganuma & Yokota 2019",
        "mixup raises K-FAC's accuracy at the large batch",
        "accuracy",
        ("kfac_mixup", "large"),
        ("kfac", "large"),
    ),
    (
        "mixup_flatter",
        "Naganuma & Yokota 2019",
        "mixup makes K-FAC's minimum flatter at the large batch",
        "sharpness",
        ("kfac_mixup", "large"),
        ("kfac", "large"),
    ),
    (
        "kfac_closes_gap",
        "Osawa et al. 2019",
        "K-FAC at the large batch closes SGD's gap (not below SGD at the small batch)",
        "not_below",
        ("kfac", "large"),
        ("sgd", "small"),
    ),
    (
        "kfac_mixup_closes_gap",
        "the study's question",
        "K-FAC + mixup at the large batch closes SGD's gap (not below SGD at the small batch)",
        "not_below",
        ("kfac_mixup", "large"),
        ("sgd", "small"),
    ),
)


def declare(models: list[str], methods: list[str]) -> list[Claim]:
    """Every claim whose two points the study runs: for each model, the claims of ``CLAIMS``
    between methods in ``methods``."""
    return [
        Claim(f"{model}:{cid}", source, statement, test, model, a, b)
        for model in models
        for cid, source, statement, test, a, b in CLAIMS
        if a[0] in methods and b[0] in methods
    ]


# -- tests ---------------------------------------------------------------------------------------
def z_score(a: Point, b: Point) -> tuple[float, float, float]:
    """``(m_a − m_b, its standard error, their ratio)`` over the seeds' final test accuracies."""
    diff = a["test_accuracy_mean"] - b["test_accuracy_mean"]
    se = math.sqrt(
        a["test_accuracy_std"] ** 2 / max(a["seeds"], 1)
        + b["test_accuracy_std"] ** 2 / max(b["seeds"], 1)
    )
    if se == 0:
        return diff, se, math.copysign(math.inf, diff) if diff else 0.0
    return diff, se, diff / se


def accuracy_verdict(z: float) -> str:
    if math.isnan(z):
        return "not measured"
    if z > THRESHOLD:
        return "agrees"
    if z < -THRESHOLD:
        return "disagrees"
    return "within noise"


def not_below_verdict(z: float) -> str:
    if math.isnan(z):
        return "not measured"
    return "disagrees" if z < -THRESHOLD else "agrees"


def separated(lower: list[float], higher: list[float]) -> str:
    """``agrees`` when every value of ``lower`` is below every value of ``higher`` (for 5
    against 5 runs a chance of 1 in 252 if both came from one distribution), ``disagrees`` when
    every value is above, else ``within noise``."""
    if not lower or not higher:
        return "not measured"
    if max(lower) < min(higher):
        return "agrees"
    if min(lower) > max(higher):
        return "disagrees"
    return "within noise"


def common_level(a: Point, b: Point, levels: list[float]) -> float | None:
    """The lowest matched-loss level that every run of both points reached."""
    for level in sorted(levels):
        key = f"{level:g}"
        if all(p["sharpness"][key]["reached"] == p["seeds"] for p in (a, b)):
            return level
    return None


def time_verdict(a: list[float], b: list[float]) -> str:
    """Non-overlap of training seconds to the target; NaN (never reached) is slowest."""
    if all(math.isnan(t) for t in [*a, *b]):
        return "not measured"
    slow_a = math.inf if any(math.isnan(t) for t in a) else max(a)
    slow_b = math.inf if any(math.isnan(t) for t in b) else max(b)
    fast_a = min((t for t in a if not math.isnan(t)), default=math.inf)
    fast_b = min((t for t in b if not math.isnan(t)), default=math.inf)
    if slow_a < fast_b:
        return "agrees"
    if slow_b < fast_a:
        return "disagrees"
    return "within noise"


def evaluate(claim: dict[str, Any], points: dict[tuple[str, str], Point], levels: list[float]):
    """The verdict of a declared claim (``Claim.declared()``) on the study's points
    (``(method, role)`` -> point of the claim's model), with the numbers behind it."""
    a, b = points.get(tuple(claim["a"])), points.get(tuple(claim["b"]))
    result: dict[str, Any] = {"id": claim["id"], "verdict": "not measured"}
    if a is None or b is None:
        return result
    test = claim["test"]
    if test in ("accuracy", "not_below"):
        diff, se, z = z_score(a, b)
        verdict = accuracy_verdict(z) if test == "accuracy" else not_below_verdict(z)
        result.update(verdict=verdict, difference=diff, standard_error=se, z=z)
        result["evidence"] = (
            f"{a['test_accuracy_mean']:.4f} vs {b['test_accuracy_mean']:.4f}, difference "
            f"{diff:+.4f} = {z:+.1f} SE"
            if math.isfinite(z)
            else f"{diff:+.4f}, no spread"
        )
    elif test == "sharpness":
        level = common_level(a, b, levels)
        if level is not None:
            key = f"{level:g}"
            va, vb = a["sharpness"][key]["values"], b["sharpness"][key]["values"]
            result.update(verdict=separated(va, vb), level=level)
            result["evidence"] = (
                f"top Hessian eigenvalue at training loss {level:g}: {min(va):.3g}–{max(va):.3g}"
                f" vs {min(vb):.3g}–{max(vb):.3g}"
            )
        else:
            result["evidence"] = "no training loss level reached by every run of both"
    elif test == "time":
        ta, tb = a["seconds_to_target"], b["seconds_to_target"]
        result.update(verdict=time_verdict(ta, tb))
        result["evidence"] = f"training seconds to the target: {span(ta)} vs {span(tb)}"
    return result


def span(values: list[float]) -> str:
    """``'1.2–3.4 s (4/5 runs)'``: the range of the runs that reached it."""
    reached = [v for v in values if not math.isnan(v)]
    if not reached:
        return f"never (0/{len(values)} runs)"
    text = f"{min(reached):.1f}–{max(reached):.1f} s"
    return text + (f" ({len(reached)}/{len(values)} runs)" if len(reached) < len(values) else "")
