"""``KFACDDPStrategy`` for the unified ``lightning`` package::

from lightning_kfac.lightning import KFACDDPStrategy   # registers kfac_ddp* in lightning.pytorch
trainer = lightning.pytorch.Trainer(strategy=KFACDDPStrategy())
"""

from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_kfac.strategy import KFACStrategyMixin


class KFACDDPStrategy(KFACStrategyMixin, DDPStrategy):
    __doc__ = KFACStrategyMixin.__doc__
    _rank_zero_info = staticmethod(rank_zero_info)
    _rank_zero_warn = staticmethod(rank_zero_warn)


KFACDDPStrategy.register_strategies(StrategyRegistry)

__all__ = ["KFACDDPStrategy"]
