"""diffuse: denoising diffusion models as readable PyTorch."""

from .denoiser import Denoiser, Prediction
from .schedule import Schedule
from .version import __version__

__all__ = ["Denoiser", "Prediction", "Schedule", "__version__"]
