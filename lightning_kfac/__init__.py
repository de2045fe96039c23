"""lightning-kfac: distributed K-FAC and mixup for PyTorch Lightning."""

from lightning_kfac.kfac import ComputeMethod, KFACNumericalWarning, KFACPreconditioner

__version__ = "0.1.0"

__all__ = ["ComputeMethod", "KFACNumericalWarning", "KFACPreconditioner", "__version__"]
