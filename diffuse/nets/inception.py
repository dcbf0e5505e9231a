"""Inception-v3 as used for FID (Heusel et al. 2017; network of Szegedy et al. 2016), loading its
weights from a local file.

The standard FID feature space is the 2048-d pool3 output of the TensorFlow Inception graph
`inception-2015-12-05`. Its PyTorch port, the file `pt_inception-2015-12-05-6726825d.pth` published
by pytorch-fid, is what torch-fidelity, pytorch-fid and most papers use. That port differs from
torchvision's ImageNet Inception-v3 in three ways, mirrored here: 1008 output classes, 3x3
average pools that exclude the zero padding (TensorFlow's behaviour; blocks Mixed_5b-d, 6b-e, 7b),
and a max pool in the pool branch of the last block (Mixed_7c). torch-fidelity and torchmetrics
load the same weights but resize with their own TF1-style bilinear filter on 8-bit input; this
network resizes with F.interpolate as pytorch-fid does, so its FIDs match pytorch-fid's. torchvision itself cannot be used beside every torch build, so the layers are written
out here with torchvision's module names, which makes the file's state dict load as it is.

Nothing is downloaded at run time. To get the weights, on any machine with internet:

    curl -LO https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

then pass the file: `inception_fid("pt_inception-2015-12-05-6726825d.pth")`, or
`diffuse eval RUN --metric fid --features inception:PATH` (or set $DIFFUSE_INCEPTION_WEIGHTS).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FIDInceptionV3", "inception_fid", "WEIGHTS_URL", "WEIGHTS_SHA256_PREFIX"]

WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub convention: the file name carries its SHA-256 prefix
HOW_TO_GET = (f"download it once on a machine with internet (curl -LO {WEIGHTS_URL}), copy it here and pass its path "
              "(--features inception:PATH, or set DIFFUSE_INCEPTION_WEIGHTS)")


class _Conv(nn.Module):
    """Convolution (no bias), batch norm (eps 1e-3, as TensorFlow's), ReLU: Inception's unit layer."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_3x3(x: Tensor) -> Tensor:
    """3x3 stride-1 average over the unpadded neighbours only (TensorFlow's SAME average pool)."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _cat(*branches: Tensor) -> Tensor:
    return torch.cat(branches, dim=1)


class _BlockA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1 -> 224 + pool_features channels."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _Conv(c_in, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _Conv(c_in, 48, 1), _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(c_in, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _Conv(64, 96, 3, padding=1), _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(c_in, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return _cat(self.branch1x1(x),
                    self.branch5x5_2(self.branch5x5_1(x)),
                    self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                    self.branch_pool(_avg_pool_3x3(x)))


class _BlockB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): strided 3x3 | 1x1-3x3-strided 3x3 | max pool -> 480 + c_in channels."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = _Conv(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(c_in, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _Conv(64, 96, 3, padding=1), _Conv(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return _cat(self.branch3x3(x),
                    self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                    F.max_pool2d(x, 3, stride=2))


class _BlockC(nn.Module):
    """17x17 block (Mixed_6b..e) with 7x7 convolutions factorised into 1x7 and 7x1 -> 768 channels."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = _Conv(c_in, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = _Conv(c_in, c7, 1), _Conv(c7, c7, **row), _Conv(c7, 192, **col)
        self.branch7x7dbl_1 = _Conv(c_in, c7, 1)
        self.branch7x7dbl_2, self.branch7x7dbl_3 = _Conv(c7, c7, **col), _Conv(c7, c7, **row)
        self.branch7x7dbl_4, self.branch7x7dbl_5 = _Conv(c7, c7, **col), _Conv(c7, 192, **row)
        self.branch_pool = _Conv(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return _cat(self.branch1x1(x),
                    self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
                    self.branch7x7dbl_5(self.branch7x7dbl_4(dbl)),
                    self.branch_pool(_avg_pool_3x3(x)))


class _BlockD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a): 1x1-strided 3x3 | 1x1-1x7-7x1-strided 3x3 | max pool -> 512 + c_in."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _Conv(c_in, 192, 1), _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = _Conv(c_in, 192, 1), _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3, self.branch7x7x3_4 = _Conv(192, 192, (7, 1), padding=(3, 0)), _Conv(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        return _cat(self.branch3x3_2(self.branch3x3_1(x)),
                    self.branch7x7x3_4(self.branch7x7x3_3(b7)),
                    F.max_pool2d(x, 3, stride=2))


class _BlockE(nn.Module):
    """8x8 block (Mixed_7b/c) with split 1x3 / 3x1 outputs -> 2048 channels. The FID graph's last block
    (Mixed_7c) max-pools in its pool branch where the paper and torchvision average."""

    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.branch1x1 = _Conv(c_in, 320, 1)
        self.branch3x3_1 = _Conv(c_in, 384, 1)
        self.branch3x3_2a, self.branch3x3_2b = _Conv(384, 384, **row), _Conv(384, 384, **col)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(c_in, 448, 1), _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = _Conv(384, 384, **row), _Conv(384, 384, **col)
        self.branch_pool = _Conv(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool_3x3(x)
        return _cat(self.branch1x1(x),
                    self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                    self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
                    self.branch_pool(pooled))


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3. `features(x)`: pool3, (B, 2048); `forward(x)`: the 1008 logits of the Inception Score.

    Takes images in [-1, 1] of any size with 1 or 3 channels: grey images are repeated to RGB and
    every image is resized bilinearly to 299x299 (F.interpolate, as pytorch-fid).
    """

    size = 299
    batch_size = 50  # images per pass in diffuse.metrics: about 1 GB of activations at 299x299

    def __init__(self, num_classes: int = 1008):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _BlockA(192, 32), _BlockA(256, 64), _BlockA(288, 64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b, self.Mixed_6c = _BlockC(768, 128), _BlockC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _BlockC(768, 160), _BlockC(768, 192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b, self.Mixed_7c = _BlockE(1280, max_pool=False), _BlockE(2048, max_pool=True)
        self.fc = nn.Linear(2048, num_classes)

    def _prepare(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"Inception takes images (B, 1 or 3, H, W) in [-1, 1], got shape {tuple(x.shape)}")
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)

    def features(self, x: Tensor) -> Tensor:
        """pool3: the 2048-d spatial mean of Mixed_7c, the FID feature vector."""
        x = self._prepare(x)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        """The Inception Score's logits pool3 @ W^T, without the bias: what the reference IS code of Salimans
        et al. (and torch-fidelity's "logits_unbiased") feed to the softmax."""
        return self.features(x) @ self.fc.weight.T


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state dict from .safetensors or a torch file; torch files are read with weights_only (no code runs)."""
    if path.suffix == ".safetensors":
        import safetensors.torch

        return safetensors.torch.load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors; expected the FID Inception weights ({HOW_TO_GET})")
    return state


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def inception_fid(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """The FID Inception-v3 with weights from a local file (default: $DIFFUSE_INCEPTION_WEIGHTS), frozen, in eval mode.

    Warns when the file is not the standard pytorch-fid file (its SHA-256 does not begin with
    6726825d): its FIDs are then not comparable with published ones.
    """
    if path is None:
        path = os.environ.get("DIFFUSE_INCEPTION_WEIGHTS")
        if not path:
            raise FileNotFoundError(f"no Inception weights file given and DIFFUSE_INCEPTION_WEIGHTS is not set; {HOW_TO_GET}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file {path} does not exist; {HOW_TO_GET}")
    try:
        state = _read_state_dict(path)
    except ValueError:
        raise
    except Exception as e:  # truncated, an HTML error page, a git-LFS pointer, or a pickle that would run code
        raise ValueError(f"cannot read Inception weights from {path} ({type(e).__name__}): it is not a complete torch or "
                         f"safetensors file of tensors; the download may be damaged or incomplete: {HOW_TO_GET}") from e
    net = FIDInceptionV3()
    expected = set(net.state_dict())
    for key in expected:  # files saved before torch 0.4.1 lack batch norm's step counters, unused in eval
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, torch.tensor(0))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{path} is not the FID Inception-v3 (pt_inception-2015-12-05): {len(missing)} missing keys "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); {HOW_TO_GET}")
    try:
        net.load_state_dict(state)
    except RuntimeError as e:  # right names, wrong shapes
        raise ValueError(f"{path} does not match the FID Inception-v3's shapes: {e}") from e
    if not _sha256(path).startswith(WEIGHTS_SHA256_PREFIX):
        warnings.warn(f"{path} is not the standard FID Inception file (its SHA-256 does not start with "
                      f"{WEIGHTS_SHA256_PREFIX}): FIDs in its feature space are not comparable with published ones",
                      UserWarning, stacklevel=2)
    return net.to(device).eval().requires_grad_(False)
