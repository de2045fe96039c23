"""Whether W&B is installed and whether its runs stay on this machine: shared by
``examples/train.py`` and the large-batch study, which write offline W&B runs without an API key
(``wandb sync`` uploads them later)."""

from __future__ import annotations

import os
from pathlib import Path


def wandb_available() -> bool:
    """Whether the ``wandb`` package can be imported."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def wandb_offline() -> bool:
    """Whether W&B runs are written locally only: ``WANDB_MODE`` says so (``offline``,
    ``dryrun``, ``disabled``), or, without ``WANDB_MODE``, no API key is configured
    (``WANDB_API_KEY`` or an ``api.wandb.ai`` entry in ``~/.netrc``)."""
    if "WANDB_MODE" in os.environ:
        return os.environ["WANDB_MODE"] in ("offline", "dryrun", "disabled")
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path.home() / ".netrc"
    return not (netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"))
