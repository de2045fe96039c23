"""``KFACDDPStrategy`` for the ``pytorch_lightning`` package (imported by ``lightning_kfac``,
which registers ``kfac_ddp``, ``kfac_ddp_spawn`` and ``kfac_ddp_fork`` in its registry)."""

from pytorch_lightning.strategies import DDPStrategy, StrategyRegistry
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_kfac.strategy import KFACStrategyMixin


class KFACDDPStrategy(KFACStrategyMixin, DDPStrategy):
    __doc__ = KFACStrategyMixin.__doc__
    _rank_zero_info = staticmethod(rank_zero_info)
    _rank_zero_warn = staticmethod(rank_zero_warn)


KFACDDPStrategy.register_strategies(StrategyRegistry)

__all__ = ["KFACDDPStrategy"]
