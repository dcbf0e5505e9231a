"""Tests for diffuse.data.segmentation: exact per-pixel labels of the digit sets and the shapes, and folders of images
with PNG masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse.data import DataConfig, load_dataset, load_image, load_mask
from diffuse.data.captions import COLOURS, SHAPES, Scene, SceneObject, coverage, render, shapes_data
from diffuse.data.segmentation import (COLOUR_SHAPE_CLASSES, DIGIT_CLASSES, IGNORE, SHAPE_CLASSES, SegmentationSet,
                                       digit_masks, fit_labels, interleaved, labelled_set, load_folder, shape_masks,
                                       shapes_scenes)


# --- the set ------------------------------------------------------------------------------------------------------

def test_a_set_refuses_labels_outside_its_classes_and_keeps_ignore():
    images = torch.zeros(2, 1, 4, 4)
    masks = torch.zeros(2, 4, 4, dtype=torch.int64)
    masks[0, 0, 0] = IGNORE
    ok = SegmentationSet(images, masks, ["a", "b", "c"])
    assert len(ok) == 2 and ok.num_classes == 3
    masks[1, :2, :] = 7
    with pytest.raises(ValueError, match=r"label 7 \(8 pixels\).*3 classes.*255"):
        SegmentationSet(images, masks, ["a", "b", "c"])
    with pytest.raises(ValueError, match="do not match"):
        SegmentationSet(images[:1], masks, ["a"] * 1 + ["b", "c"])
    with pytest.raises(ValueError, match="int64"):
        SegmentationSet(images, masks.int(), ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        SegmentationSet(images + 2, torch.zeros_like(masks), ["a"])
    with pytest.raises(ValueError, match="unique"):
        SegmentationSet(images, torch.zeros_like(masks), ["a", "a"])


def test_subset_keeps_examples_in_order_and_checks_indices():
    images = torch.linspace(-1, 1, 3).view(3, 1, 1, 1).expand(3, 1, 2, 2).contiguous()
    masks = torch.arange(3).view(3, 1, 1).expand(3, 2, 2).contiguous()
    data = SegmentationSet(images, masks, ["a", "b", "c"])
    part = data.subset(torch.tensor([2, 0]))
    assert part.masks[:, 0, 0].tolist() == [2, 0] and part.images[:, 0, 0, 0].tolist() == [1.0, -1.0]
    assert part.class_names == data.class_names and part.class_names is not data.class_names
    assert len(data.subset(torch.tensor([True, False, True]))) == 2
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        data.subset(torch.tensor([3]))


# --- digits -------------------------------------------------------------------------------------------------------

def test_digit_masks_label_the_ink_with_its_digit():
    x = torch.full((2, 1, 3, 3), -1.0)
    x[0, 0, 1, :] = torch.tensor([0.0, 0.5, 1.0])  # 0.0 is ink 0.5 exactly: not more than half, so background
    x[1, 0, :, 2] = 0.01
    masks = digit_masks(x, torch.tensor([3, 7]))
    assert masks.dtype == torch.int64
    assert masks[0].tolist() == [[0, 0, 0], [0, 4, 4], [0, 0, 0]]
    assert masks[1].tolist() == [[0, 0, 8], [0, 0, 8], [0, 0, 8]]
    assert [set(m.unique().tolist()) for m in masks] == [{0, 4}, {0, 8}]
    assert len(DIGIT_CLASSES) == 11 and DIGIT_CLASSES[4] == "three"


def test_digit_masks_refuse_what_is_not_a_digit_batch():
    x = torch.zeros(2, 1, 3, 3)
    with pytest.raises(ValueError, match=r"\(N, 1, S, S\)"):
        digit_masks(torch.zeros(2, 3, 3, 3), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="0..9"):
        digit_masks(x, torch.tensor([1, 10]))
    with pytest.raises(ValueError, match=r"127.5"):
        digit_masks(x + 100, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="integer label"):
        digit_masks(x, torch.tensor([1.0, 2.0]))


def test_interleaved_takes_one_of_each_class_in_turn():
    assert interleaved(torch.tensor([0, 0, 1, 1, 1, 2])).tolist() == [0, 2, 5, 1, 3, 4]


@pytest.fixture(scope="module")
def mnist():
    return load_dataset(DataConfig(source="mnist", image_size=28, channels=1))


def test_the_mnist_pool_labels_every_stroke_pixel_with_its_digit(mnist):
    pool = labelled_set("mnist", 50, 28, 1)
    order = interleaved(mnist.labels)[:50]
    labels = mnist.labels[order]
    assert torch.equal(pool.images, mnist.images[order].float() / 127.5 - 1)
    assert torch.bincount(labels, minlength=10).tolist() == [5] * 10  # the sorted set, taken a digit at a time
    stroke = pool.images[:, 0] > 0  # (N, S, S)
    assert torch.equal(pool.masks, torch.where(stroke, 1 + labels.view(-1, 1, 1), 0))
    assert torch.equal(stroke, torch.from_numpy(mnist.images[order, 0].numpy() >= 128))  # ink > 0.5 of 255
    for mask, label, ink in zip(pool.masks, labels, stroke):
        assert set(mask.unique().tolist()) == {0, 1 + int(label)}
        assert (mask == 1 + label).sum() == ink.sum() > 0
    assert pool.class_names == DIGIT_CLASSES


def test_resized_digits_are_labelled_from_the_resized_pixels():
    digits = load_dataset(DataConfig(source="digits", image_size=12, channels=3))
    pool = labelled_set("digits", 20, 12, 3)
    order = interleaved(digits.labels)[:20]
    assert pool.images.shape == (20, 3, 12, 12)
    assert torch.equal(pool.images, digits.images[order].float() / 127.5 - 1)
    expected = torch.where(digits.images[order, 0] >= 128, 1 + digits.labels[order].view(-1, 1, 1), 0)
    assert torch.equal(pool.masks, expected)
    assert len(labelled_set("digits", 0, 8, 1)) == 1797  # n <= 0: all


# --- shapes -------------------------------------------------------------------------------------------------------

def test_shapes_scenes_are_shapes_data_bit_for_bit():
    images, scenes = shapes_scenes(12, 32, seed=3)
    assert images.dtype == torch.uint8 and len(scenes) == 12
    assert np.array_equal(images.numpy(), shapes_data(12, 32, seed=3)[0])
    assert np.array_equal(images.numpy(), shapes_data(20, 32, seed=3)[0][:12])
    assert all(np.array_equal(render(s, 32), im) for s, im in zip(scenes, images.numpy()))


def test_shape_masks_are_the_pixels_an_object_covers_more_than_half():
    images, scenes = shapes_scenes(40, 32, seed=1)
    masks, names = shape_masks(scenes, 32)
    assert names == SHAPE_CLASSES and masks.shape == (40, 32, 32)
    singles = [i for i, s in enumerate(scenes) if len(s.objects) == 1]
    assert singles
    for i in singles:
        obj = scenes[i].objects[0]
        cover = coverage(obj, 32)
        assert np.array_equal(images[i].numpy().max(0), np.rint(cover * 255))  # the renderer's own coverage
        assert np.array_equal(masks[i].numpy() != 0, cover > 0.5)
        assert set(masks[i].unique().tolist()) == {0, 1 + SHAPES.index(obj.shape)}
    blank = images.amax(1) == 0  # (N, S, S): nothing drawn
    assert (masks[blank] == 0).all() and (masks[images.amax(1) > 128] != 0).all()


def test_colour_classes_name_the_colour_and_the_shape():
    scene = Scene((SceneObject("blue", "triangle", "large", (0.3, 0.5)),
                   SceneObject("yellow", "circle", "small", (0.75, 0.5))), relation="left of")
    masks, names = shape_masks([scene], 32, colour=True)
    assert names == COLOUR_SHAPE_CLASSES and len(names) == 1 + len(COLOURS) * len(SHAPES)
    assert names[9] == "blue triangle" and names[10] == "yellow circle"
    assert set(masks.unique().tolist()) == {0, 9, 10}
    assert masks[0, 16, 9] == 9 and masks[0, 16, 24] == 10 and masks[0, 0, 0] == 0
    shape_only, _ = shape_masks([scene], 32)
    assert set(shape_only.unique().tolist()) == {0, 3, 1}


def test_where_objects_overlap_the_larger_coverage_wins():
    a, b = SceneObject("red", "square", "large", (0.45, 0.5)), SceneObject("blue", "circle", "large", (0.6, 0.5))
    masks, _ = shape_masks([Scene((a, b), relation="left of")], 32)
    ca, cb = coverage(a, 32), coverage(b, 32)
    both = (ca > 0.5) & (cb > 0.5) & (ca != cb)
    assert both.any()
    expected = np.where(ca > cb, 1 + SHAPES.index("square"), 1 + SHAPES.index("circle"))
    assert np.array_equal(masks[0].numpy()[both], expected[both])


def test_the_shapes_pool_matches_its_scenes():
    pool = labelled_set("shapes", 6, 32, 3, colour=True, seed=2)
    images, scenes = shapes_scenes(6, 32, seed=2)
    assert torch.equal(pool.images, images.float() / 127.5 - 1)
    assert torch.equal(pool.masks, shape_masks(scenes, 32, colour=True)[0])
    assert pool.num_classes == 16


def test_labelled_set_names_the_source_and_the_fix():
    with pytest.raises(ValueError, match=r'"photos".*"folder"'):
        labelled_set("photos", 10, 32, 3)
    with pytest.raises(ValueError, match="channels = 3"):
        labelled_set("shapes", 10, 32, 1)
    with pytest.raises(ValueError, match="mnist, digits, shapes, folder"):
        labelled_set("cifar", 10, 32, 3)
    with pytest.raises(ValueError, match="colour"):
        labelled_set("mnist", 10, 28, 1, colour=True)
    with pytest.raises(ValueError, match="needs path"):
        labelled_set("folder", 10, 28, 1)


def test_coverage_checks_its_object():
    with pytest.raises(ValueError, match="SceneObject"):
        coverage(Scene((SceneObject("red", "circle", "small", (0.5, 0.5)),)))
    with pytest.raises(ValueError, match="hexagon"):
        coverage(SceneObject("red", "hexagon", "small", (0.5, 0.5)))


# --- folders ------------------------------------------------------------------------------------------------------

def write_image(path, size=(28, 28), seed=0, fmt=None):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, fmt)


def palette_mask(labels: np.ndarray) -> Image.Image:
    img = Image.fromarray(labels.astype(np.uint8), "L").convert("P")  # "L" -> "P" keeps the values as indices
    img.putpalette([v for k in range(256) for v in ((k * 37) % 256, (k * 91) % 256, (k * 53) % 256)])
    return img


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rng = np.random.default_rng(0)
    labels = {name: rng.integers(0, 4, (28, 28)) for name in ("a", "b", "c")}
    labels["b"][:3] = IGNORE
    for k, name in enumerate(labels):
        write_image(tmp_path / "images" / f"{name}.png", seed=k)
    palette_mask(labels["a"]).save(tmp_path / "masks" / "a.png")
    Image.fromarray(labels["b"].astype(np.uint8), "L").save(tmp_path / "masks" / "b.png")
    Image.fromarray(labels["c"].astype(np.uint16)).save(tmp_path / "masks" / "c.png")
    return tmp_path, labels


def test_a_folder_round_trips_palette_gray_and_16_bit_labels(folder):
    root, labels = folder
    for name, mode in (("a", "P"), ("b", "L"), ("c", "I;16")):
        assert Image.open(root / "masks" / f"{name}.png").mode == mode
    data = load_folder(root, 3, 28)
    assert data.class_names == ["class 0", "class 1", "class 2", "class 3"]
    assert np.array_equal(data.masks.numpy(), np.stack([labels[n] for n in "abc"]))
    assert torch.equal(data.images[1:2], load_image(root / "images" / "b.png", 3, 28)[0])
    (root / "classes.txt").write_text("sky\nroad\ncar\nperson\nbike\n")
    assert load_folder(root, 3, 28).class_names == ["sky", "road", "car", "person", "bike"]
    with pytest.warns(UserWarning, match="3 note.*converted from RGB colour to grayscale"):
        gray = labelled_set("folder", 2, 28, 1, path=str(root))
    assert len(gray) == 2 and torch.equal(gray.masks, data.masks[:2])


def test_a_label_beyond_classes_txt_is_named(folder):
    root, _ = folder
    (root / "classes.txt").write_text("sky\nroad\ncar\n")
    with pytest.raises(ValueError, match=r"a.png holds label 3.*classes.txt names 3 classes"):
        load_folder(root, 3, 28)


def test_a_mask_of_another_size_names_both_files(folder):
    root, _ = folder
    (root / "images" / "a.png").unlink()
    write_image(root / "images" / "a.jpg", size=(30, 30), fmt="JPEG")
    with pytest.raises(ValueError, match=r"masks/a.png is 28x28 but its image .*images/a.jpg is 30x30"):
        load_folder(root, 3, 28)


def test_an_rgb_mask_is_refused(folder):
    root, labels = folder
    Image.fromarray(labels["a"].astype(np.uint8), "L").convert("RGB").save(root / "masks" / "a.png")
    with pytest.raises(ValueError, match="a.png is a RGB image; save it as a palette or grayscale PNG"):
        load_folder(root, 3, 28)


def test_unpaired_files_are_named(folder):
    root, _ = folder
    (root / "masks" / "b.png").unlink()
    with pytest.raises(ValueError, match=r"1 image\(s\) .* have no mask: b.png"):
        load_folder(root, 3, 28)
    (root / "images" / "b.png").unlink()
    (root / "images" / "c.png").unlink()
    with pytest.raises(ValueError, match=r"mask\(s\) .* have no image: c.png"):
        load_folder(root, 3, 28)
    (root / "bare" / "images").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no masks/ folder"):
        load_folder(root / "bare", 3, 28)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_folder(root / "nowhere", 3, 28)


def test_masks_are_fitted_as_their_images_with_nearest_resampling(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    write_image(tmp_path / "images" / "square.png", size=(56, 56))
    quadrants = np.zeros((56, 56), np.uint8)
    quadrants[:28, :28], quadrants[:28, 28:], quadrants[28:, 28:] = 3, 1, 2
    palette_mask(quadrants).save(tmp_path / "masks" / "square.png")
    write_image(tmp_path / "images" / "wide.png", size=(84, 56))
    thirds = np.repeat(np.arange(84)[None] // 28, 56, axis=0)  # (56, 84): label = which third of the width
    Image.fromarray(thirds.astype(np.uint8), "L").save(tmp_path / "masks" / "wide.png")
    with pytest.warns(UserWarning, match="2 note"):
        data = load_folder(tmp_path, 1, 28)
    square, wide = data.masks.numpy()
    assert (square[:14, :14] == 3).all() and (square[:14, 14:] == 1).all() and (square[14:, 14:] == 2).all()
    assert (square[14:, :14] == 0).all()
    # 84x56 -> 42x28, centre crop from column 7: output column j reads source column 2 (j + 7) + 1
    assert (wide == np.array([0] * 7 + [1] * 14 + [2] * 7)[None]).all()


def test_fit_labels_crops_as_load_mask_does(tmp_path):
    rng = np.random.default_rng(0)
    values = (rng.random((45, 70)) < 0.5).astype(np.uint8) * 255
    write_image(tmp_path / "image.png", size=(70, 45))
    Image.fromarray(values, "L").save(tmp_path / "mask.png")
    with pytest.warns(UserWarning):
        _, geometry = load_image(tmp_path / "image.png", 1, 16)
    keep = load_mask(tmp_path / "mask.png", geometry)[0, 0].numpy() == 1  # data.images' own geometry for masks
    assert np.array_equal(fit_labels(values.astype(np.int64), 16) == 255, ~keep)


def test_stray_files_and_twin_names_are_named(folder):
    root, _ = folder
    (root / "images" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"images holds files other than images.*notes.txt"):
        load_folder(root, 3, 28)
    (root / "images" / "notes.txt").unlink()
    write_image(root / "images" / "a.jpg", fmt="JPEG")
    with pytest.raises(ValueError, match="a.jpg and a.png: one file per name"):
        load_folder(root, 3, 28)
    (root / "images" / "a.jpg").unlink()
    (root / "classes.txt").write_text("sky\n\nroad\ncar\n")
    with pytest.raises(ValueError, match="line 2 is blank"):
        load_folder(root, 3, 28)
