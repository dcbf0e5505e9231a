"""Data: the dataset protocol (base.py), image sources and files (images.py), videos (video.py: moving digits, folders
of GIFs and MP4s), captions and the captioned shapes (captions.py). The names most callers need are importable from
here; `load_dataset` reads every source (video.load_dataset: the video sources, else images.load_dataset)."""

from .base import Dataset, Subset, shape_of
from .images import (DataConfig, Geometry, ImageDataset, ImageTooLarge, check_images, load_image, load_mask,
                     max_image_pixels, open_image)
from .video import (VIDEO_SOURCES, MovingDigits, Trajectory, VideoFolder, check_video_config, load_dataset,
                    read_video)

__all__ = ["DataConfig", "Dataset", "Geometry", "ImageDataset", "ImageTooLarge", "MovingDigits", "Subset", "Trajectory",
           "VIDEO_SOURCES", "VideoFolder", "check_images", "check_video_config", "load_dataset", "load_image", "load_mask",
           "max_image_pixels", "open_image", "read_video", "shape_of"]
