"""Tests for diffuse.captions: the scene grammar, its round trip, the detector and the captioned data sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffuse.data import captions
from diffuse.data.captions import (ANCHORS, COLOURS, DIGIT_WORDS, EXTENTS, Phrase, Scene, SceneObject, Target, caption,
                              detect, digit_caption, parse_prompt, prompt_scores, random_scene, render, shapes_data,
                              target_of)
from diffuse.data import DataConfig, ImageDataset, load_dataset


def unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> float (N, 3, S, S) in [-1, 1], as the model sees them."""
    return torch.from_numpy(images).float() / 127.5 - 1.0


@pytest.fixture(scope="module")
def scenes500():
    images, texts = shapes_data(500, 32, seed=1)
    return images, texts


def test_caption_round_trip_over_every_kind_of_scene():
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(400)]
    for s in scenes:
        assert parse_prompt(caption(s)) == target_of(s), caption(s)
    kinds = {"relation" if s.relation else "position" if s.position else "count" for s in scenes}
    assert kinds == {"relation", "position", "count"}
    assert {s.relation for s in scenes} >= set(captions.RELATIONS)
    assert {s.position for s in scenes} >= set(captions.POSITIONS)
    assert {o.colour for s in scenes for o in s.objects} == set(COLOURS)


def test_captions_read_as_the_scene():
    red = SceneObject("red", "circle", "large", ANCHORS["left"])
    assert caption(Scene((red,), position="left")) == "a large red circle on the left"
    blue = SceneObject("blue", "square", "small", (0.5, 0.73))
    assert caption(Scene((SceneObject("red", "circle", "small", (0.5, 0.27)), blue), relation="above")) == \
        "a small red circle above a small blue square"
    three = tuple(SceneObject("blue", "square", "small", (x, 0.5)) for x in (1 / 6, 0.5, 5 / 6))
    assert caption(Scene(three)) == "three small blue squares"
    with pytest.raises(ValueError, match="alike"):
        caption(Scene((red, blue)))
    with pytest.raises(ValueError, match="purple"):
        render(Scene((SceneObject("purple", "circle", "large", (0.5, 0.5)),)), 32)


def test_users_prompts_parse():
    assert parse_prompt("a green triangle on the left") == Target((Phrase("triangle", "green"),), position="left")
    assert parse_prompt("A small blue square at the top.") == Target((Phrase("square", "blue", "small"),), position="top")
    assert parse_prompt("a red circle in the center") == Target((Phrase("circle", "red"),), position="centre")
    assert parse_prompt("two green triangles") == Target((Phrase("triangle", "green", count=2),))
    assert parse_prompt("three small blue squares") == Target((Phrase("square", "blue", "small", 3),))
    assert parse_prompt("a red circle above a blue square") == \
        Target((Phrase("circle", "red"), Phrase("square", "blue")), relation="above")
    assert parse_prompt("the green triangle to the left of the yellow circle") == \
        Target((Phrase("triangle", "green"), Phrase("circle", "yellow")), relation="left of")
    assert parse_prompt("a white square under a red large circle") == \
        Target((Phrase("square", "white"), Phrase("circle", "red", "large")), relation="below")
    assert parse_prompt("a circle") == Target((Phrase("circle"),))


@pytest.mark.parametrize("prompt, named", [
    ("a purple circle", "'purple'"),
    ("a red hexagon on the left", "'hexagon'"),
    ("four red circles", "'four'"),
    ("a red", "shape"),
    ("two red circle", "'circles'"),
    ("a red circles", "'circle'"),
    ("a red circle above", "'above'"),
    ("a red circle on the", "'the'"),
    ("two red circles on the left", "one object"),
    ("a red circle red square", "'red'"),
    ("a large small circle", "two sizes"),
    ("", "no words"),
    ("a handwritten red circle", "handwritten DIGIT"),
])
def test_bad_prompts_name_the_problem(prompt, named):
    with pytest.raises(ValueError, match=named) as info:
        parse_prompt(prompt)
    if named in ("'purple'", "'hexagon'"):
        assert "unknown word" in str(info.value) and "circle" in str(info.value) and "yellow" in str(info.value)


def test_digit_captions_round_trip():
    assert DIGIT_WORDS[7] == "seven" and digit_caption(7) == "a handwritten seven"
    for d in range(10):
        assert parse_prompt(digit_caption(d)) == Target(digit=d)
    assert parse_prompt("A handwritten 3") == Target(digit=3)
    for bad in (10, -1, 2.0, True):
        with pytest.raises(ValueError, match="0..9"):
            digit_caption(bad)
    with pytest.raises(ValueError, match="digit classifier"):
        prompt_scores(torch.zeros(1, 3, 32, 32), ["a handwritten two"])


def test_render_draws_the_scene_antialiased():
    obj = SceneObject("yellow", "square", "large", (0.5, 0.5))
    image = render(Scene((obj,), position="centre"), 40)  # the square spans pixels 12..27 exactly
    assert image.shape == (3, 40, 40) and image.dtype == np.uint8
    assert (image[:, 12:28, 12:28] == np.array([255, 255, 0])[:, None, None]).all()
    assert image.sum() == 16 * 16 * 2 * 255
    circle = render(Scene((SceneObject("blue", "circle", "small", (0.3, 0.6)),)), 32)
    assert circle[:2].max() == 0 and 0 < (circle[2] % 255).sum()  # blue only, with partly covered edge pixels
    area = circle[2].sum() / 255 / 32**2
    assert area == pytest.approx(np.pi / 4 * EXTENTS["small"] ** 2, rel=0.05)


def test_shapes_data_deterministic_in_seed():
    a, ta = shapes_data(20, 24, seed=3)
    b, tb = shapes_data(20, 24, seed=3)
    c, tc = shapes_data(20, 24, seed=4)
    assert a.shape == (20, 3, 24, 24) and a.dtype == np.uint8
    assert np.array_equal(a, b) and ta == tb
    assert not np.array_equal(a, c) and ta != tc
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="scenes"):
            shapes_data(bad)
    with pytest.raises(ValueError, match="16"):
        shapes_data(4, size=12)


def test_detect_finds_what_was_drawn():
    scene = Scene((SceneObject("red", "triangle", "large", (0.27, 0.52)),), position="left")
    for image in (render(scene, 32), unit(render(scene, 32)[None])[0], unit(render(scene, 32)[None])[0].numpy()):
        (d,) = detect(image)
        assert (d.colour, d.shape, d.size) == ("red", "triangle", "large")
        assert d.centre == pytest.approx((0.27, 0.52), abs=0.02) and d.extent == pytest.approx(0.40, abs=0.03)
    assert detect(np.zeros((3, 32, 32), np.uint8)) == []
    with pytest.raises(ValueError, match="RGB image"):
        detect(np.zeros((1, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="NaN"):
        detect(torch.full((3, 16, 16), float("nan")))


def test_detector_scores_true_renders_as_correct(scenes500):
    images, texts = scenes500
    scores = prompt_scores(unit(images), texts)
    f = scores["fraction"]
    assert f["all"] >= 0.99, f  # measured: 1.0 (500 scenes here; 2,000 with seed 7: 1.0)
    for criterion in ("colour", "shape", "size", "count", "position"):
        assert f[criterion] >= 0.99, (criterion, f)
    assert scores["per_image"]["all"].shape == (500,) and scores["asked"]["colour"].all()


def test_detector_scores_mismatched_prompts_low(scenes500):
    images, texts = scenes500
    wrong = texts[1:] + texts[:1]  # each image judged against the next scene's caption
    f = prompt_scores(unit(images), wrong)["fraction"]
    assert f["all"] <= 0.02, f  # measured: 0.0 (colour 0.12, shape 0.22, position 0.02)
    assert f["colour"] <= 0.2 and f["shape"] <= 0.35 and f["position"] <= 0.1, f


def test_detector_works_at_16_and_64_pixels():
    for size, at_least in ((16, 0.95), (64, 0.99)):  # measured on 200 scenes: 0.995 and 1.0
        images, texts = shapes_data(100, size, seed=2)
        assert prompt_scores(unit(images), texts)["fraction"]["all"] >= at_least, size


def test_detector_tolerates_noise_as_in_samples():
    images, texts = shapes_data(100, 32, seed=5)
    noisy = (unit(images) + 0.25 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert prompt_scores(noisy, texts)["fraction"]["all"] >= 0.97  # measured: 1.0 on 500 scenes


def test_prompt_scores_asks_only_what_the_prompt_says():
    scene = Scene((SceneObject("green", "circle", "large", ANCHORS["right"]),), position="right")
    x = unit(render(scene, 32)[None])
    scores = prompt_scores(x.repeat(4, 1, 1, 1), ["a circle", "a green circle on the left", "a blue circle on the right",
                                                  "two green circles"])
    per, asked = scores["per_image"], scores["asked"]
    assert per["all"].tolist() == [True, False, False, False]
    assert asked["colour"].tolist() == [False, True, True, True] and asked["position"].tolist() == [False, True, True, False]
    assert per["position"].tolist() == [True, False, False, True]  # the blue circle is not found, so not placed either
    assert per["colour"].tolist() == [True, True, False, True] and per["count"].tolist() == [True, True, True, False]
    assert scores["fraction"]["position"] == 0.0
    with pytest.raises(ValueError, match="len\\(prompts\\) = 2"):
        prompt_scores(x, ["a circle", "a square"])


def test_load_dataset_shapes_gives_captioned_rgb_images():
    cfg = DataConfig(source="shapes", crops=64, image_size=32, channels=3)
    ds = load_dataset(cfg)
    images, texts = shapes_data(64, 32, seed=0)
    assert len(ds) == 64 and ds.num_classes == 0 and ds.condition_keys == ()
    x, cond = ds.batch(torch.arange(64))
    assert x.shape == (64, 3, 32, 32) and x.min() >= -1 and x.max() <= 1 and cond == {}
    assert torch.equal(x, unit(images)) and ds.captions == texts
    assert prompt_scores(x, ds.captions)["fraction"]["all"] >= 0.95
    with pytest.raises(ValueError, match="channels = 3"):
        load_dataset(DataConfig(source="shapes", crops=8, image_size=32, channels=1))
    with pytest.raises(ValueError, match="image_size >= 16"):
        load_dataset(DataConfig(source="shapes", crops=8, image_size=8, channels=3))
    with pytest.raises(ValueError, match="crops"):
        load_dataset(DataConfig(source="shapes", crops=0, image_size=32, channels=3))
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        ImageDataset(torch.zeros(3), [], 3, 16, images=torch.zeros(3, 3, 16, 16, dtype=torch.uint8), captions=["a", "b"])


def test_digit_sources_caption_their_labels():
    for source in ("mnist", "digits"):
        ds = load_dataset(DataConfig(source=source, image_size=8 if source == "digits" else 28))
        assert len(ds.captions) == len(ds)
        assert [parse_prompt(c).digit for c in ds.captions] == ds.labels.tolist()
        assert ds.captions[0] == digit_caption(int(ds.labels[0]))


def test_photos_have_no_captions():
    pytest.importorskip("skimage")
    assert load_dataset(DataConfig(source="photos", crops=4, image_size=16, channels=3)).captions is None
