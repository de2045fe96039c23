"""``KFACDDPStrategy`` for the unified ``lightning`` package::

from lightning_kfac.lightning import KFACDDPStrategy   # registers kfac_ddp* in lightning.pytorch
trainer = lightning.pytorch.Trainer(strategy=KFACDDPStrategy())
"""

from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

from lightning_kfac.strategy import build_strategy_class

KFACDDPStrategy = build_strategy_class(DDPStrategy, StrategyRegistry)

__all__ = ["KFACDDPStrategy"]
