"""Tests for diffuse.data.attributes: digit thickness, slant and size measured on strokes of known geometry and on
real MNIST digits, the binary targets, and the errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffuse.data import DataConfig, load_dataset
from diffuse.data.attributes import (ATTRIBUTES, binarise, ink, measure, size, skeleton_length, slant, thickness,
                                     width)
from diffuse.data.segmentation import interleaved




def blank(h: int = 32, w: int = 32, b: int = 1) -> torch.Tensor:
    return -torch.ones(b, 1, h, w, dtype=torch.float64)


def sheared_bar(k: float, thick: int = 3, h: int = 32, w: int = 32, top: int = 4, bottom: int = 28) -> torch.Tensor:
    """A bar `thick` px wide over rows top..bottom-1 whose left edge runs along x = 12 + k * y, y = the height above
    the centre row (up), anti-aliased so each row's ink-weighted mean column is exactly that x + (thick - 1) / 2."""
    x = blank(h, w)
    yc = (top + bottom - 1) / 2
    for row in range(top, bottom):
        left = 12 + k * (yc - row)
        i, f = math.floor(left), left - math.floor(left)
        p = torch.zeros(w, dtype=torch.float64)
        p[i], p[i + thick] = 1 - f, f  # the ends share one pixel's ink
        p[i + 1:i + thick] = 1.0
        x[0, 0, row] = 2 * p - 1
    return x


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """200 bundled MNIST digits, 20 of each, (200, 1, 28, 28) float64 in [-1, 1], and their labels."""
    data = load_dataset(DataConfig(source="mnist", image_size=28, channels=1))
    order = interleaved(data.labels)[:200]
    return data.images[order].double() / 127.5 - 1.0, data.labels[order]


# --- ink ----------------------------------------------------------------------------------------------------------

def test_ink_is_the_clipped_intensity():
    x = torch.tensor([-1.2, -1.0, 0.0, 0.5, 1.0, 1.3]).view(1, 1, 1, 6)
    assert ink(x).flatten().tolist() == [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]
    assert ink(x).dtype == torch.float64


# --- thickness ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("w", [1, 2, 3, 4])
def test_a_bar_measures_its_width(w):
    x = blank()
    x[0, 0, 14:14 + w, 4:28] = 1.0  # w x 24 px
    t = thickness(x).item()
    assert abs(t - w) <= 0.15 * w  # thinning shortens each end of the skeleton by about w / 2
    if w <= 2:
        assert t == w  # no end effect: the skeleton is the bar's full length


def test_a_ring_measures_its_width_with_no_ends():
    rows, cols = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    r = ((rows - 23.5) ** 2 + (cols - 23.5) ** 2).sqrt()
    for w in (2, 3, 4, 5):
        x = torch.where((r > 14 - w / 2) & (r < 14 + w / 2), 1.0, -1.0).view(1, 1, 48, 48)
        assert abs(thickness(x).item() - w) <= 0.08 * w


def test_a_thicker_stroke_measures_thicker_and_faint_ink_counts_by_its_intensity():
    x = blank(b=4)
    for i, w in enumerate((1, 2, 3, 4)):
        x[i, 0, 14:14 + w, 4:28] = 1.0
    t = thickness(x)
    assert (t.diff() > 0).all()
    half = x[1:2].clone()
    half[0, 0, 13, 4:28] = 0.0  # a row of half ink (p = 0.5, not an ink pixel) beside the 2 px bar
    assert thickness(half).item() == pytest.approx(2.5)


def test_diagonal_steps_count_their_length():
    line = torch.eye(10, dtype=torch.bool).unsqueeze(0)  # a one-pixel diagonal of 10 pixels
    assert skeleton_length(line).item() == pytest.approx(10 + 9 * (math.sqrt(2) - 1))
    corner = torch.zeros(1, 5, 5, dtype=torch.bool)
    corner[0, 2, 0:3] = corner[0, 0:3, 2] = True  # an L of 5 pixels: thinning cuts its corner to a diagonal step
    assert skeleton_length(corner).item() == pytest.approx(4 + (math.sqrt(2) - 1))
    assert skeleton_length(torch.zeros(2, 4, 4, dtype=torch.bool)).tolist() == [0.0, 0.0]
    # a 2 px stroke along a diagonal measures about 2, as along an axis
    rows, cols = torch.meshgrid(torch.arange(40.0), torch.arange(40.0), indexing="ij")
    band = ((cols - rows).abs() / math.sqrt(2) < 1) & (cols > 8) & (cols < 32)
    assert thickness(torch.where(band, 1.0, -1.0).view(1, 1, 40, 40)).item() == pytest.approx(2, rel=0.05)


# --- slant --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [-0.5, 0.0, 0.3])
def test_a_sheared_bar_measures_its_shear(k):
    x = sheared_bar(k)
    assert slant(x).item() == pytest.approx(k, abs=1e-12)
    assert slant(x.flip(-1)).item() == pytest.approx(-k, abs=1e-12)  # the mirror image leans the other way
    hard = torch.where(x > -1, 1.0, -1.0)  # every touched pixel full ink: no longer anti-aliased
    assert slant(hard).item() == pytest.approx(k, abs=0.03)


def test_a_stroke_like_a_slash_slants_positive():
    x = blank()
    for row in range(4, 28):
        col = 30 - row  # up the rows, to the right: "/"
        x[0, 0, row, col:col + 2] = 1.0
    assert slant(x).item() == pytest.approx(1.0)
    assert slant(x.flip(-1)).item() == pytest.approx(-1.0)  # "\"
    flat = blank()
    flat[0, 0, 10, 3:20] = 1.0  # ink in one row: no lean to measure
    assert slant(flat).item() == 0.0


# --- size ---------------------------------------------------------------------------------------------------------

def test_a_rectangle_measures_its_height_and_width():
    x = blank(32, 40, b=2)
    x[0, 0, 5:22, 9:16] = 1.0  # 17 rows, 7 columns
    x[1, 0, 30, 39] = 0.1  # one ink pixel in the corner
    x[1, 0, 0, 0] = 0.0  # half ink: not an ink pixel
    assert size(x).tolist() == [17.0, 1.0]
    assert width(x).tolist() == [7.0, 1.0]


# --- real digits --------------------------------------------------------------------------------------------------

def test_translation_changes_no_attribute(digits):
    x = F.pad(digits[0][:20], (6, 6, 6, 6), value=-1.0)  # (20, 1, 40, 40): room to move
    before = measure(x)
    for dy, dx in ((3, -5), (-6, 6)):
        after = measure(torch.roll(x, (dy, dx), (2, 3)))
        assert torch.equal(after["size"], before["size"])
        for name in ("thickness", "slant"):  # equal up to the order of float64 sums
            torch.testing.assert_close(after[name], before[name], rtol=1e-12, atol=1e-12)
        assert torch.equal(skeleton_length(torch.roll(x, (dy, dx), (2, 3))[:, 0] > 0), skeleton_length(x[:, 0] > 0))


def test_dilating_digits_thickens_them(digits):
    x = digits[0][:50]
    dilated = F.max_pool2d(x, 3, stride=1, padding=1)  # grey dilation by a 3 x 3 square
    assert (thickness(dilated) > thickness(x)).double().mean() >= 0.95


def test_mnist_digits_lean_right_and_ones_are_narrowest(digits):
    x, y = digits
    s = slant(x)
    assert s.mean() > 0.05 and (s > 0).double().mean() > 0.6  # handwriting leans right: "/" is positive
    w = width(x)
    means = torch.stack([w[y == d].mean() for d in range(10)])
    assert means.argmin() == 1 and means[1] < 0.75 * means[[0, 2, 3, 4, 5, 6, 7, 8, 9]].min()


def test_deskewing_by_the_measured_slant_removes_it(digits):
    """Shearing each digit by minus its slant about its mean height (bilinear resampling) leaves almost none."""
    x = digits[0][:50]
    s = slant(x)
    b, _, h, w = x.shape
    p = ink(x)[:, 0]
    rows, cols = torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64)
    mean_row = (p * rows.view(1, h, 1)).sum((1, 2)) / p.sum((1, 2))
    height = (mean_row.view(b, 1, 1) - rows.view(1, h, 1))  # (B, H, 1): y up from the mean
    source_col = cols.view(1, 1, w) + s.view(b, 1, 1) * height  # out(x, y) = in(x + s * y, y)
    grid = torch.stack([2 * source_col / (w - 1) - 1, (2 * rows / (h - 1) - 1).view(1, h, 1).expand(b, h, w)], -1)
    deskewed = F.grid_sample(x, grid, align_corners=True, padding_mode="border")  # border: background
    assert s.abs().mean() > 0.2
    assert slant(deskewed).abs().max() < 0.05


# --- measure ------------------------------------------------------------------------------------------------------

def test_measure_gives_each_attribute_as_its_function_does(digits):
    x = digits[0][:8].float()
    out = measure(x)
    assert list(out) == list(ATTRIBUTES) == ["thickness", "slant", "size"]
    for name, fn in ATTRIBUTES.items():
        assert torch.equal(out[name], fn(x)) and out[name].dtype == torch.float64
    assert list(measure(x, ["size"])) == ["size"]


# --- binarise -----------------------------------------------------------------------------------------------------

def test_the_median_splits_distinct_values_in_half():
    for n in (10, 11):
        values = torch.randperm(n, generator=torch.Generator().manual_seed(n)).double() * 0.7
        labels, threshold = binarise(values)
        assert labels.dtype == torch.int64 and labels.sum().item() == n // 2
        assert torch.equal(labels, (values > threshold).long())
        assert threshold == pytest.approx(values.median().item() if n % 2 else 0.7 * (n - 1) / 2)


def test_an_explicit_threshold_is_honoured():
    labels, threshold = binarise(torch.tensor([0.1, 0.5, 0.9, 0.5]), threshold=0.5)
    assert labels.tolist() == [0, 0, 1, 0] and threshold == 0.5
    with pytest.raises(ValueError, match="finite"):
        binarise(torch.tensor([0.1, math.nan]))
    with pytest.raises(ValueError, match="threshold"):
        binarise(torch.tensor([0.1]), threshold=math.inf)


# --- errors -------------------------------------------------------------------------------------------------------

def test_an_empty_image_is_named_or_nan():
    x = blank(b=4)
    x[1, 0, 10:20, 10:13] = 1.0
    x[3, 0, 5:9, 5:9] = 0.0  # half ink everywhere: still no ink pixel
    for fn in (thickness, slant, size, width):
        with pytest.raises(ValueError, match=r"image\(s\) 0, 2, 3 of 4 have no ink.*empty image"):
            fn(x)
        out = fn(x, empty="nan")
        assert out.isnan().tolist() == [True, False, True, True]
    with pytest.raises(ValueError, match="'raise'.*'nan'"):
        size(x, empty="zero")
    assert measure(x[1:2], empty="nan")["size"].item() == 10.0


def test_bad_inputs_are_refused_naming_the_fix():
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\).*\(2, 3, 8, 8\)"):
        measure(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\).*\(8, 8\)"):
        thickness(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="uint8"):
        slant(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))
    x = torch.zeros(3, 1, 8, 8)
    x[2, 0, 1, 1] = math.nan
    with pytest.raises(ValueError, match=r"image\(s\) 2 hold NaN"):
        size(x)
    with pytest.raises(ValueError, match="unknown attribute.*'slope'.*thickness, slant, size"):
        measure(x[:2], ["slant", "slope"])
