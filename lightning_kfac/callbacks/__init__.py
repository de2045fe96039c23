"""Lightning callbacks."""

from lightning_kfac.callbacks.sharpness import SharpnessCallback
from lightning_kfac.mixup.callback import MixupCallback

__all__ = ["MixupCallback", "SharpnessCallback"]
