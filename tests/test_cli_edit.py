"""`diffuse edit sdedit|inpaint|ilvr`: outputs, the before/after figure, and every bad input refused with nothing written."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse.app.cli import main
from diffuse.tasks import low_pass

from test_cli import TINY, _sets


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("edit") / "run"  # the VP twin of the demo: its tiny model's outputs stay in range
    assert main(["train", "configs/mnist_cond_vp.toml", *_sets(TINY), "--out", str(out)]) == 0
    return out


def digit(path, size=8, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    Image.fromarray(pixels, "L").save(path)
    return pixels


def mask(path, size=8, bottom_white=True):
    m = np.zeros((size, size), np.uint8)
    if bottom_white:
        m[size // 2:] = 255  # generate the bottom half, keep the top
    Image.fromarray(m, "L").save(path)


def test_sdedit_writes_outputs_and_a_before_after_figure(run, tmp_path):
    pixels = digit(tmp_path / "in.png")
    out = tmp_path / "out.npy"
    assert main(["edit", "sdedit", str(run), "--image", str(tmp_path / "in.png"), "--strength", "0", "--n", "3",
                 "--label", "4", "--out", str(out)]) == 0
    x = np.load(out)
    assert x.shape == (3, 1, 8, 8)
    np.testing.assert_allclose(x[:, 0], np.broadcast_to(pixels / 255.0, (3, 8, 8)), atol=1e-6)  # strength 0: the input
    figure = Image.open(tmp_path / "out_before_after.png")
    assert figure.size == ((4 * (8 + 2) + 2) * 4, (8 + 2 + 2) * 4)  # one row: the input, then the 3 outputs (2-px gaps, x4)
    assert main(["edit", "sdedit", str(run), "--image", str(tmp_path / "in.png"), "--strength", "0.5", "--steps", "4",
                 "--sampler", "dpmpp-2m", "--guidance", "1", "--out", str(tmp_path / "half.png")]) == 0
    assert (tmp_path / "half.png").is_file() and (tmp_path / "half_before_after.png").is_file()


def test_inpaint_keeps_the_black_region_of_the_mask(run, tmp_path):
    pixels = digit(tmp_path / "in.png", seed=1)
    mask(tmp_path / "mask.png")
    for extra in ([], ["--repaint-jumps", "3", "--repaint-length", "2"]):
        out = tmp_path / "out.npy"
        assert main(["edit", "inpaint", str(run), "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"),
                     "--n", "2", "--steps", "4", "--out", str(out), *extra]) == 0
        x = np.load(out)
        np.testing.assert_allclose(x[:, 0, :4], np.broadcast_to(pixels[:4] / 255.0, (2, 4, 8)), atol=1e-6)
        assert np.abs(x[:, 0, 4:] - pixels[4:] / 255.0).max() > 0.05  # the white half is generated


def test_ilvr_outputs_follow_the_references_block_means(run, tmp_path):
    pixels = digit(tmp_path / "ref.png", seed=2)
    out = tmp_path / "out.npy"
    assert main(["edit", "ilvr", str(run), "--reference", str(tmp_path / "ref.png"), "--factor", "4", "--n", "2",
                 "--steps", "5", "--threshold", "none", "--out", str(out)]) == 0
    x = torch.from_numpy(np.load(out)) * 2 - 1
    ref = torch.from_numpy(pixels).float()[None, None] / 127.5 - 1
    # [0, 1] output clamps what lies outside; the block means still follow the reference closely
    assert float((low_pass(x, 4) - low_pass(ref, 4)).abs().max()) < 0.1


def test_an_image_of_another_size_is_resized_with_a_note(run, tmp_path):
    digit(tmp_path / "big.png", size=16)
    with pytest.warns(UserWarning, match="resized from 16x16 to the model's 8x8"):
        assert main(["edit", "sdedit", str(run), "--image", str(tmp_path / "big.png"), "--strength", "0.3", "--steps", "3",
                     "--n", "1", "--out", str(tmp_path / "o.png")]) == 0
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.warns(UserWarning, match="converted from RGB colour to grayscale"):
        assert main(["edit", "sdedit", str(run), "--image", str(tmp_path / "rgb.png"), "--strength", "0.3", "--steps", "3",
                     "--n", "1", "--out", str(tmp_path / "o2.png")]) == 0


@pytest.mark.parametrize("case, match", [
    ("mask_size", "the mask .* is 4x4 but the image .* is 8x8"),
    ("mask_all_keep", "keeps every pixel: nothing to inpaint"),
    ("mask_all_generate", "keeps no pixel"),
    ("not_an_image", "is not a readable image"),
    ("missing", "does not exist"),
    ("factor", "must be >= 1 and divide the image size"),
    ("classifier_run", "not a denoiser"),
])
def test_bad_inputs_are_named_and_nothing_is_written(run, tmp_path, capsys, case, match):
    digit(tmp_path / "in.png")
    out = tmp_path / "out.png"
    image = ["--image", str(tmp_path / "in.png")]
    if case == "mask_size":
        mask(tmp_path / "m.png", size=4)
        argv = ["inpaint", str(run), *image, "--mask", str(tmp_path / "m.png")]
    elif case == "mask_all_keep":
        mask(tmp_path / "m.png", bottom_white=False)
        argv = ["inpaint", str(run), *image, "--mask", str(tmp_path / "m.png")]
    elif case == "mask_all_generate":
        Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "m.png")
        argv = ["inpaint", str(run), *image, "--mask", str(tmp_path / "m.png")]
    elif case == "not_an_image":
        (tmp_path / "junk.png").write_bytes(b"not an image")
        argv = ["sdedit", str(run), "--image", str(tmp_path / "junk.png"), "--strength", "0.5"]
    elif case == "missing":
        argv = ["sdedit", str(run), "--image", str(tmp_path / "nope.png"), "--strength", "0.5"]
    elif case == "factor":
        argv = ["ilvr", str(run), "--reference", str(tmp_path / "in.png"), "--factor", "3"]
    else:
        clf = tmp_path / "clf"
        assert main(["train", "configs/mnist_classifier.toml", *_sets(TINY), "--out", str(clf)]) == 0
        argv = ["sdedit", str(clf), *image, "--strength", "0.5"]
    assert main(["edit", *argv, "--out", str(out)]) == 2
    import re
    assert re.search(match, capsys.readouterr().err)
    assert not out.exists() and not (tmp_path / "out_before_after.png").exists()


def test_out_of_range_flags_fail_when_parsed(run, tmp_path):
    digit(tmp_path / "in.png")
    for argv in (["sdedit", str(run), "--image", str(tmp_path / "in.png"), "--strength", "1.5"],
                 ["sdedit", str(run), "--image", str(tmp_path / "in.png"), "--strength", "nan"],
                 ["ilvr", str(run), "--reference", str(tmp_path / "in.png"), "--factor", "0"]):
        with pytest.raises(SystemExit):
            main(["edit", *argv, "--out", str(tmp_path / "o.png")])
    assert not (tmp_path / "o.png").exists()


def test_the_strength_says_what_it_means_on_every_process(capsys):
    """--help states the one meaning of the SDEdit strength (sigma/alpha = s / (1 - s) on every process)."""
    with pytest.raises(SystemExit):
        main(["edit", "sdedit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "sigma/alpha = s / (1 - s)" in text and "the same on every process (VP, EDM, flow)" in text
    assert "t_top" not in text


def test_one_output_is_that_image_at_its_size(run, tmp_path):
    """--n 1 (and --mean) writes the image itself, 8x8 here, not a 12x12 grid with a white frame; several are a grid.
    The PNG's pixels are the .npy output's, rounded to 8 bits."""
    digit(tmp_path / "in.png")
    edit = ["edit", "sdedit", str(run), "--image", str(tmp_path / "in.png"), "--strength", "0.5", "--steps", "2"]
    for extra in (["--n", "1"], ["--n", "3", "--mean"]):
        for suffix in (".png", ".npy"):
            assert main([*edit, *extra, "--out", str(tmp_path / f"one{suffix}")]) == 0
        png = np.asarray(Image.open(tmp_path / "one.png"))
        assert png.shape == (8, 8), extra
        np.testing.assert_array_equal(png, np.round(np.load(tmp_path / "one.npy")[0, 0] * 255).astype(np.uint8))
    for n, side in ((1, 8), (4, 2 * (8 + 2) + 2)):
        assert main(["sample", str(run), "--n", str(n), "--steps", "2", "--out", str(tmp_path / "s.png")]) == 0
        assert Image.open(tmp_path / "s.png").size == (side, side)
