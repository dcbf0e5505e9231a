"""Tasks built on a trained denoiser: editing without training (editing.py: SDEdit, inpainting/RePaint, ILVR), and what a
diffusion autoencoder does with an image (semantic.py: encode, decode, manipulate, interpolate)."""

from .editing import ilvr, inpaint, low_pass, repaint_grid, sdedit

__all__ = ["ilvr", "inpaint", "low_pass", "repaint_grid", "sdedit"]
