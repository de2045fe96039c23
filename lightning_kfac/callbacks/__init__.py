"""Lightning callbacks."""

from lightning_kfac.callbacks.mixup import MixupCallback
from lightning_kfac.callbacks.sharpness import SharpnessCallback

__all__ = ["MixupCallback", "SharpnessCallback"]
