"""Lightning callbacks."""

from lightning_kfac.callbacks.mixup import MixupCallback

__all__ = ["MixupCallback"]
