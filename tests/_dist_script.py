"""Training runs that ``tests/test_distributed_guarantees.py`` starts as subprocesses.

Run from the repository root as ``python -m tests._dist_script <mode> --out DIR ...``:

- ``launch --strategy NAME``: 2 CPU ranks with a registered strategy name; Lightning's popen
  launcher (``kfac_ddp``) re-runs this very command for rank 1, which is why it is a script.
- ``stall``: 2 ranks (``ddp_fork``), ``KFACDDPStrategy(timeout=...)``; rank 1 sleeps after its
  backward pass on an inverse-update step, so rank 0 waits in a K-FAC collective.

Every rank writes ``DIR/<tag>-rank<r>.pt`` (``RankResult``).
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytorch_lightning as pl
import torch

from lightning_kfac import KFACDDPStrategy
from tests._dist_models import RankResult, StallAfterBackward
from tests.lightning_support import TinyClassifier, trainer_kwargs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["launch", "stall"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", default="kfac_ddp")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=15.0)
    parser.add_argument("--sleep", type=float, default=120.0)
    parser.add_argument("--stall-step", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)

    callbacks: list[pl.Callback] = [RankResult(args.out, tag=args.mode)]
    if args.mode == "launch":
        strategy: str | KFACDDPStrategy = args.strategy
    else:
        strategy = KFACDDPStrategy(
            start_method="fork",
            timeout=timedelta(seconds=args.timeout),
            inverse_update_interval=2,
        )
        marker = os.path.join(args.out, "stall-started")
        callbacks.append(StallAfterBackward(1, args.stall_step, args.sleep, marker))
    trainer = pl.Trainer(
        strategy=strategy,
        devices=2,
        max_steps=args.steps,
        callbacks=callbacks,
        **trainer_kwargs(args.out),
    )
    trainer.fit(TinyClassifier(batch_size=8, dtype=torch.float32))


if __name__ == "__main__":
    main()
