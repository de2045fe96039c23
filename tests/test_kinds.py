"""The registry of kinds of use: one module per kind, one table for the docs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lightning_kfac.kfac import kinds
from lightning_kfac.kfac.kinds import KroneckerModel, UnitWiseModel

ROOT = Path(__file__).resolve().parents[1]
TABLE = re.compile(r"<!-- supported-uses:begin -->\n(.*?)\n<!-- supported-uses:end -->", re.S)


@pytest.mark.parametrize("page", ["README.md", "docs/design.md"])
def test_docs_tables_are_the_registry(page: str) -> None:
    """The supported-uses tables are ``supported_uses_markdown()``, between markers."""
    found = TABLE.findall((ROOT / page).read_text())
    assert found == [kinds.supported_uses_markdown()], (
        f"{page}'s supported-uses table differs from the registry: paste the output of "
        "lightning_kfac.kfac.kinds.supported_uses_markdown() between its markers"
    )


def test_every_kind_is_registered_once_with_a_model_and_a_table_row() -> None:
    names = [kind.name for kind in kinds.KINDS]
    assert len(set(names)) == len(names)
    claimed = {function for kind in kinds.KINDS for function in kind.recognizers}
    assert set(kinds.RECOGNIZERS) == claimed
    for kind in kinds.KINDS:
        assert kind.supported, f"{kind.name} has no row in the supported-uses table"
        if kind.model is None:  # a kind that only runs composites modelled by other kinds
            assert kind.composites and not kind.recognizers, kind.name
            continue
        assert issubclass(kind.model, KroneckerModel | UnitWiseModel), kind.name
        assert kinds.kind_named(kind.name) is kind


def test_unknown_kind_is_named() -> None:
    with pytest.raises(ValueError, match="unknown kind of use 'lstm'; known: linear"):
        kinds.kind_named("lstm")
