"""diffuse: denoising diffusion models as readable PyTorch."""

from .denoiser import Denoiser, Prediction
from .schedule import Schedule

__version__ = "0.1.0"
__all__ = ["Denoiser", "Prediction", "Schedule"]
