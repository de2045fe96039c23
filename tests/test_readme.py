"""Every Python snippet of the README runs as written (issue 18), read from the file itself.

What a snippet leaves to the reader is a placeholder: a name it uses without defining
(``model``, "your LightningModule") or assigns ``...`` (``model = ...``). The test supplies those
and nothing else — a snippet using any other undefined name fails here. A snippet that trains on
2 ranks (``devices=2``) runs as a script in a fresh process, with Lightning's popen launcher
re-running it for rank 1, in an empty home directory and without any W&B key or mode set: as on a
fresh machine without credentials.
"""

from __future__ import annotations

import ast
import builtins
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.lightning_support import YourModel

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)


def placeholders_removed(code: str) -> tuple[str, set[str]]:
    """The snippet without its ``name = ...`` lines, and the names it needs from the reader."""
    tree = ast.parse(code)
    placeholders = set()
    body = []
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Constant)
            and node.value.value is Ellipsis
        ):
            placeholders.add(node.targets[0].id)
            continue
        body.append(node)
    tree.body = body
    stored, loaded = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (stored if isinstance(node.ctx, ast.Store) else loaded).add(node.id)
        elif isinstance(node, ast.alias):
            stored.add((node.asname or node.name).partition(".")[0])
    free = loaded - stored - set(dir(builtins))
    return ast.unparse(tree), placeholders | free


def readers_objects(code: str) -> dict[str, Any]:
    """What the reader brings: a LightningModule for the Lightning snippets; a model and a
    loader of ``(x, y)`` batches for the plain PyTorch one."""
    if "Trainer" in code:
        return {"model": YourModel()}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    loader = [(torch.randn(32, 8), torch.randint(0, 3, (32,))) for _ in range(4)]
    return {"model": model, "loader": loader}


def test_the_readme_has_its_snippets() -> None:
    assert len(SNIPPETS) >= 4
    assert any("devices=2" in code and "WandbLogger" in code for code in SNIPPETS)


@pytest.mark.parametrize(
    "code",
    [c for c in SNIPPETS if "devices=2" not in c],
    ids=lambda code: code.strip().splitlines()[-1][:40],
)
def test_snippet_runs(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runnable, needed = placeholders_removed(code)
    given = readers_objects(code)
    assert needed <= set(given), f"the snippet uses {needed - set(given)} without defining them"
    monkeypatch.chdir(tmp_path)  # Lightning's logs and checkpoints land here
    namespace = {"__name__": "__main__", **{name: given[name] for name in needed}}
    exec(compile(runnable, "README.md", "exec"), namespace)
    if "trainer" in namespace and "Trainer(" in code and ".fit(" in code:
        assert namespace["model"].trainer.global_step >= 3


@pytest.mark.slow
@pytest.mark.parametrize("code", [c for c in SNIPPETS if "devices=2" in c], ids=["headline"])
def test_two_rank_snippet_runs_without_credentials(code: str, tmp_path: Path) -> None:
    runnable, needed = placeholders_removed(code)
    assert needed == {"model"}, needed
    script = tmp_path / "snippet.py"
    script.write_text(
        "import torch\n"
        "from tests.lightning_support import YourModel\n"
        "torch.set_num_threads(1)\n"
        "model = YourModel()\n" + runnable + "\n"
    )
    home = tmp_path / "home"
    home.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("WANDB_")
        and k not in {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "RANK"}
    }
    env.update(HOME=str(home), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    completed = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, completed.stderr[-3000:]
