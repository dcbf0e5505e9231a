"""Data: the dataset protocol (base.py), image sources and files (images.py), captions and the captioned shapes
(captions.py). The names most callers need are importable from here."""

from .base import Dataset, Subset, shape_of
from .images import (DataConfig, Geometry, ImageDataset, ImageTooLarge, check_images, load_dataset, load_image, load_mask,
                     max_image_pixels, open_image)

__all__ = ["DataConfig", "Dataset", "Geometry", "ImageDataset", "ImageTooLarge", "Subset", "check_images", "load_dataset",
           "load_image", "load_mask", "max_image_pixels", "open_image", "shape_of"]
