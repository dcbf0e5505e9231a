"""Tasks built on a trained denoiser: editing without training (editing.py: SDEdit, inpainting/RePaint, ILVR), and what a
diffusion autoencoder does with an image (semantic.py: encode, decode, manipulate, interpolate), and videos' frames given
and generated (video.py: masked conditioning, replacement, reconstruction guidance, long videos by FDM's schemes)."""

from .editing import ilvr, inpaint, low_pass, repaint_grid, sdedit
from .video import (SCHEMES, ObservedFrames, ReconstructionGuidance, autoregressive, condition_frames, hierarchy_2,
                    interpolation_stages, sample_long, sample_masked, sample_reconstruction, sample_replacement,
                    sample_stages, sdedit_video)

__all__ = ["ilvr", "inpaint", "low_pass", "repaint_grid", "sdedit", "SCHEMES", "ObservedFrames", "ReconstructionGuidance",
           "autoregressive", "condition_frames", "hierarchy_2", "sample_long", "sample_masked", "sample_reconstruction",
           "sample_replacement", "interpolation_stages", "sample_stages", "sdedit_video"]
