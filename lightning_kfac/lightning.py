"""``KFACDDPStrategy`` for the unified ``lightning`` package (``lightning.pytorch``)::

    import lightning.pytorch as L
    from lightning_kfac.lightning import KFACDDPStrategy

    trainer = L.Trainer(strategy=KFACDDPStrategy(damping=1e-3))
    trainer = L.Trainer(strategy="kfac_ddp")  # after `import lightning_kfac`, in either order

``lightning.pytorch`` and ``pytorch_lightning`` are separate class hierarchies with separate
registries: this class is a ``lightning.pytorch`` ``DDPStrategy``,
``lightning_kfac.KFACDDPStrategy`` a ``pytorch_lightning`` one. Importing this module registers
the ``kfac_ddp*`` names in ``lightning.pytorch``; ``import lightning_kfac`` arranges that for
whenever ``lightning.pytorch`` is imported (without importing it itself).

``MixupCallback`` here is ``lightning_kfac.MixupCallback``, also a ``lightning.pytorch.Callback``:
``lightning.pytorch.Trainer`` 2.6 accepts either, 2.4 (tested) only this one, and so does
``LightningCLI``'s type check (``class_path: lightning_kfac.lightning.MixupCallback``).
"""

from lightning.pytorch import Callback
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_kfac.mixup.callback import MixupCallback as _MixupCallback
from lightning_kfac.strategy import KFACStrategyMixin


class KFACDDPStrategy(KFACStrategyMixin, DDPStrategy):
    __doc__ = KFACStrategyMixin.__doc__
    _rank_zero_info = staticmethod(rank_zero_info)
    _rank_zero_warn = staticmethod(rank_zero_warn)
    _fits = "lightning.pytorch.Trainer"
    _other = "with pytorch_lightning.Trainer use lightning_kfac.KFACDDPStrategy"


class MixupCallback(_MixupCallback, Callback):
    __doc__ = _MixupCallback.__doc__
    # The same hooks, called by name in both namespaces; being also a ``lightning.pytorch``
    # ``Callback`` satisfies the unified Trainer's and LightningCLI's type checks.


KFACDDPStrategy.register_strategies(StrategyRegistry)

__all__ = ["KFACDDPStrategy", "MixupCallback"]
