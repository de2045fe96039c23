"""``KFACDDPStrategy`` for the ``pytorch_lightning`` package (``lightning_kfac.KFACDDPStrategy``).

Importing it registers ``kfac_ddp``, ``kfac_ddp_spawn`` and ``kfac_ddp_fork`` in
``pytorch_lightning``'s registry; ``import lightning_kfac`` arranges that for whenever
``pytorch_lightning`` is imported.
"""

from pytorch_lightning.strategies import DDPStrategy, StrategyRegistry
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_kfac.strategy import KFACStrategyMixin


class KFACDDPStrategy(KFACStrategyMixin, DDPStrategy):
    __doc__ = KFACStrategyMixin.__doc__
    _rank_zero_info = staticmethod(rank_zero_info)
    _rank_zero_warn = staticmethod(rank_zero_warn)
    _fits = "pytorch_lightning.Trainer"
    _other = (
        "with lightning.pytorch.Trainer (the unified `lightning` package) use "
        "lightning_kfac.lightning.KFACDDPStrategy, or strategy='kfac_ddp'"
    )


KFACDDPStrategy.register_strategies(StrategyRegistry)

__all__ = ["KFACDDPStrategy"]
