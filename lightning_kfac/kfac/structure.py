"""The structure of a model for K-FAC: which uses are preconditioned, how, and what is left.

From the uses seen in the training forward (``UseSpec``), the parameters are grouped into
*components*: parameters linked by a common use (a weight and its bias; the weights that share an
MHA ``in_proj_bias``; an embedding matrix tied to an LM head). A component is preconditioned only
if K-FAC models every use of every parameter in it; otherwise all of it is left to the optimizer
and the reason is named — a parameter is never preconditioned with the factors of only some of its
uses (docs/design.md, "Several uses of one parameter").

Within a component, a parameter whose uses touch disjoint rows (MHA's q and kv projections of
``in_proj_weight``) gives each use its rows of ``.grad``; a parameter with overlapping uses (a
tied embedding and LM head, one ``nn.Linear`` shared by two modules) collects each use's gradient
separately (through an alias view, see ``capture``), and its step is the sum over uses of each
use's preconditioned gradient — what the untied model would get.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence

from torch import nn

from lightning_kfac.kfac.calls import ParameterView
from lightning_kfac.kfac.kinds import UseModel
from lightning_kfac.kfac.uses import UseSpec


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, item: str) -> str:
        self.parent.setdefault(item, item)
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def _interval(view: ParameterView, length: int) -> tuple[int, int]:
    return view.rows if view.rows is not None else (0, length)


@dataclasses.dataclass
class ParameterReport:
    """What K-FAC does with one trainable parameter."""

    name: str
    shape: tuple[int, ...]
    treatment: str  # a kind's ``UseModel.treatment`` ("Kronecker", "unit-wise", ...) or "optimizer"
    detail: str
    uses: list[str]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def preconditioned(self) -> bool:
        return self.treatment != "optimizer"


class Structure:
    """Kept uses, their names and gradient routes, and the per-parameter report.

    Args:
        specs: Every use seen (agreed between ranks), in a deterministic order.
        parameters: Tracked parameters by name.
        unsupported: Parameter name -> operations K-FAC cannot model that used it.
        skipped: Trainable parameters K-FAC does not track, with the reason (``skip_modules``).
        model_of: The ``UseModel`` of a spec.
    """

    def __init__(
        self,
        specs: Sequence[UseSpec],
        parameters: dict[str, nn.Parameter],
        unsupported: dict[str, set[str]],
        skipped: dict[str, str],
        model_of: Callable[[UseSpec], UseModel],
    ) -> None:
        self.parameters = parameters
        union = _UnionFind()
        for name in parameters:
            union.find(name)
        for spec in specs:
            names = [part.name for part in spec.parts]
            for other in names[1:]:
                union.union(names[0], other)
        bad_roots: dict[str, str] = {}
        for name in unsupported:
            if name in parameters:
                bad_roots.setdefault(union.find(name), name)
        self.kept: list[UseSpec] = [
            spec for spec in specs if union.find(spec.parts[0].name) not in bad_roots
        ]
        self.models = {spec: model_of(spec) for spec in self.kept}
        self.alias_parts = self._alias_parts()
        self.names = self._names()
        self.sites = sorted({spec.site for spec in self.kept})
        self.reports = self._reports(specs, unsupported, skipped, union, bad_roots)

    # -- gradient routes ------------------------------------------------------------------
    def _alias_parts(self) -> dict[UseSpec, frozenset[str]]:
        touches: dict[str, list[tuple[UseSpec, str, tuple[int, int]]]] = {}
        for spec in self.kept:
            for role, view in (("weight", spec.weight), ("bias", spec.bias)):
                if view is None:
                    continue
                length = (
                    self.parameters[view.name].shape[0] if self.parameters[view.name].dim() else 1
                )
                touches.setdefault(view.name, []).append((spec, role, _interval(view, length)))
        alias: dict[UseSpec, set[str]] = {spec: set() for spec in self.kept}
        for entries in touches.values():
            for i, (spec_i, role_i, (lo_i, hi_i)) in enumerate(entries):
                for spec_j, role_j, (lo_j, hi_j) in entries[i + 1 :]:
                    if lo_i < hi_j and lo_j < hi_i:  # the two uses touch common rows
                        alias[spec_i].add(role_i)
                        alias[spec_j].add(role_j)
        return {spec: frozenset(parts) for spec, parts in alias.items()}

    def _names(self) -> dict[UseSpec, str]:
        base = {spec: (spec.weight or spec.bias).name for spec in self.kept}  # type: ignore[union-attr]
        counts: dict[str, int] = {}
        for name in base.values():
            counts[name] = counts.get(name, 0) + 1
        names: dict[UseSpec, str] = {}
        taken: set[str] = set()
        for spec in self.kept:
            name = base[spec]
            if counts[name] > 1:
                part = spec.weight or spec.bias
                rows = f"[{part.rows[0]}:{part.rows[1]}]" if part and part.rows else ""  # type: ignore[union-attr]
                name = f"{name}{rows}@{spec.site or '<root>'}:{spec.kind}"
            candidate, suffix = name, 1
            while candidate in taken:
                suffix += 1
                candidate = f"{name}#{suffix}"
            taken.add(candidate)
            names[spec] = candidate
        return names

    # -- report ---------------------------------------------------------------------------
    def _reports(
        self,
        specs: Sequence[UseSpec],
        unsupported: dict[str, set[str]],
        skipped: dict[str, str],
        union: _UnionFind,
        bad_roots: dict[str, str],
    ) -> list[ParameterReport]:
        uses_of: dict[str, list[UseSpec]] = {}
        for spec in specs:
            for part in spec.parts:
                uses_of.setdefault(part.name, []).append(spec)
        reports = []
        for name, param in self.parameters.items():
            uses = [spec.label() for spec in uses_of.get(name, [])]
            shape = tuple(param.shape)
            if name in unsupported:
                detail = "used by " + ", ".join(sorted(unsupported[name]))
                reports.append(ParameterReport(name, shape, "optimizer", detail, uses))
                continue
            root = union.find(name)
            if root in bad_roots:
                culprit = bad_roots[root]
                detail = (
                    f"shares a use with {culprit}, which K-FAC cannot model "
                    f"({', '.join(sorted(unsupported[culprit]))})"
                )
                reports.append(ParameterReport(name, shape, "optimizer", detail, uses))
                continue
            kept = [spec for spec in self.kept if any(p.name == name for p in spec.parts)]
            if not kept:
                detail = "not used in the training forward K-FAC traced"
                reports.append(ParameterReport(name, shape, "optimizer", detail, uses))
                continue
            models = [self.models[spec] for spec in kept]
            notes = [f"{len(kept)} uses"] if len(kept) > 1 else []
            for model in models:
                notes += model.report_notes()
            treatment = "/".join(dict.fromkeys(model.treatment for model in models))
            reports.append(
                ParameterReport(name, shape, treatment, "; ".join(dict.fromkeys(notes)), uses)
            )
        for name, reason in skipped.items():
            reports.append(ParameterReport(name, (), "optimizer", reason, []))
        return reports

    def skipped_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        for report in self.reports:
            if report.name in shapes and not report.shape:
                report.shape = shapes[report.name]

    @property
    def preconditioned_fraction(self) -> float:
        total = sum(r.numel for r in self.reports)
        done = sum(r.numel for r in self.reports if r.preconditioned)
        return done / total if total else 1.0

    def left_to_optimizer(self) -> list[ParameterReport]:
        return [r for r in self.reports if not r.preconditioned]


def format_table(reports: Iterable[ParameterReport], fraction: float) -> str:
    """A ``ModelSummary``-like table of ``reports``."""
    reports = list(reports)
    total = sum(r.numel for r in reports)
    rows = [("", "parameter", "shape", "elements", "K-FAC", "uses / reason")]
    for i, report in enumerate(reports):
        what = report.treatment if not report.detail else f"{report.treatment} ({report.detail})"
        if not report.preconditioned:
            what = f"left to the optimizer: {report.detail}"
        uses = "; ".join(report.uses) if report.preconditioned else ""
        rows.append(
            (
                str(i),
                report.name,
                "×".join(str(s) for s in report.shape) or "-",
                f"{report.numel:,}",
                what,
                uses,
            )
        )
    widths = [max(len(row[c]) for row in rows) for c in range(5)]
    lines = [
        f"K-FAC coverage: {100 * fraction:.1f} % of {total:,} trainable parameter elements get a "
        "K-FAC step"
    ]
    for row in rows:
        cells = [row[c].ljust(widths[c]) for c in range(5)]
        lines.append(" | ".join(cells) + (f" | {row[5]}" if row[5] else ""))
    return "\n".join(lines)
