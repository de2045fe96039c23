"""``KFACDDPStrategy`` for the ``pytorch_lightning`` package (imported by ``lightning_kfac``)."""

from pytorch_lightning.strategies import DDPStrategy, StrategyRegistry

from lightning_kfac.strategy import build_strategy_class

KFACDDPStrategy = build_strategy_class(DDPStrategy, StrategyRegistry)

__all__ = ["KFACDDPStrategy"]
