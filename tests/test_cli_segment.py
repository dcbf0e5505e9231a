"""`diffuse segment`, `diffuse eval --metric miou` and the web page's Segment tab, on a tiny segmentation run: the mask
PNG holds exactly the run's labels, the figure has its three panels, the mIoU printed and recorded is the run's own,
a labelled folder scores as the held-out set it was written from, and every bad input is refused, naming the fix,
with nothing written."""

import json
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse.app.cli import main
from diffuse.app.segment import DPI, PANEL_INCHES, Segmented
from diffuse.config import apply_overrides, from_dict, load_config
from diffuse.data import load_image
from diffuse.data.segmentation import read_mask
from diffuse.kinds.segmentation import SegmentationRun
from diffuse.visualize import label_palette
from diffuse.train import feature_network, train
from diffuse.visualize import save_grid

SEGMENTER = {  # a pixel ensemble on the diffusion run's features: 10 labelled digits, 20 held out, 30 steps
    "data": dict(source="mnist", image_size=28, channels=1),
    "model": dict(kind="segmenter"),
    "segment": dict(train_images=10, test_images=20),
    "train": dict(steps=30, batch_size=320, lr=0.001, warmup_steps=0, log_every=10, checkpoint_every=30),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(diffusion run, segmentation run on its features): configs/mnist.toml for 4 steps (the labels need not be good,
    only the segmenter's own), then the segmenter."""
    folder = tmp_path_factory.mktemp("segment")
    cfg = apply_overrides(load_config("configs/mnist.toml"),
                          ["train.steps=4", "train.time_limit=0", "train.checkpoint_every=4"])
    train(cfg, folder / "diff", progress=False)
    seg = from_dict({**SEGMENTER, "segment": {**SEGMENTER["segment"], "source": str(folder / "diff")}})
    train(seg, folder / "seg", progress=False)
    return folder / "diff", folder / "seg"


@pytest.fixture(scope="module")
def model(runs):
    return SegmentationRun(runs[1], "cpu", feature_network=feature_network)


@pytest.fixture(scope="module")
def held_out(model):
    return model.held_out()


@pytest.fixture(scope="module")
def evaluated(model):
    """SegmentationRun.evaluate() on the run's held-out images: what `diffuse eval` must print and record."""
    return model.evaluate()


def write_digit(held_out, k: int, path):
    """Held-out image k as an 8-bit PNG (exact: the digits are 8-bit)."""
    save_grid(held_out.images[k:k + 1], path)
    return path


def labels_of(model, path) -> tuple[torch.Tensor, torch.Tensor, object]:
    """What the run gives for an image file, read as `diffuse segment` reads it: (image (C, S, S), labels (S, S),
    uncertainty (S, S), geometry)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fitting's note: the command says it
        x, geometry = load_image(path, *model.image_shape[:2])
    labels, uncertainty = model.segment(x)
    return x[0], labels[0], uncertainty[0], geometry


def last_record(run) -> dict:
    return json.loads((run / "eval.json").read_text())[-1]


# --- diffuse segment ---------------------------------------------------------------------------------------------
def test_the_mask_holds_exactly_the_runs_labels_and_the_figure_has_three_panels(runs, model, held_out, tmp_path, capsys):
    image = write_digit(held_out, 0, tmp_path / "digit.png")
    mask = tmp_path / "out" / "mask.png"
    assert main(["segment", str(runs[1]), "--image", str(image), "--out", str(mask), "--device", "cpu"]) == 0
    x, labels, uncertainty, geometry = labels_of(model, image)
    assert len(labels.unique()) >= 2  # not a trivial map: the check below means something
    written = Image.open(mask)
    assert written.mode == "P" and written.size == (28, 28)
    np.testing.assert_array_equal(np.asarray(written), labels.numpy())
    np.testing.assert_array_equal(read_mask(mask, geometry), labels.numpy())  # as a labelled folder's mask reads
    palette = np.asarray(written.getpalette()[:3 * model.num_classes]).reshape(-1, 3)
    np.testing.assert_array_equal(palette, (label_palette(model.num_classes) * 255).round().numpy())
    figure = Image.open(tmp_path / "out" / "mask_overlay.png")
    panel = PANEL_INCHES * DPI
    assert 2.5 * panel < figure.width < 3.5 * panel and figure.height < figure.width / 2  # three panels side by side
    line = capsys.readouterr().out.strip()
    summary = Segmented(x, labels, uncertainty, model.class_names).summary()
    assert line == f"{image}: {summary} -> {mask}, {tmp_path / 'out' / 'mask_overlay.png'}"
    assert re.search(r"background \d+\.\d%.*; mean uncertainty [0-9.e-]+ nats$", summary)


def test_several_images_go_to_a_folder_one_mask_each(runs, model, held_out, tmp_path, capsys):
    images = [write_digit(held_out, k, tmp_path / f"{name}.png") for k, name in ((1, "first"), (2, "second"))]
    Image.open(images[1]).resize((56, 56), Image.NEAREST).save(images[1])  # another size: fitted, with a note
    out = tmp_path / "masks"
    with pytest.warns(UserWarning, match="second.png: resized from 56x56 to the model's 28x28"):
        assert main(["segment", str(runs[1]), "--image", str(images[0]), "--image", str(images[1]), "--out", str(out),
                     "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["first_mask.png", "first_mask_overlay.png", "second_mask.png",
                                                     "second_mask_overlay.png"]
    for image in images:
        mask = Image.open(out / f"{image.stem}_mask.png")
        assert mask.size == (28, 28)  # the model's size
        np.testing.assert_array_equal(np.asarray(mask), labels_of(model, image)[1].numpy())
    assert len(capsys.readouterr().out.strip().splitlines()) == 2  # one line per image


def test_bad_inputs_are_refused_naming_the_fix_and_nothing_is_written(runs, held_out, tmp_path, capsys):
    diff, seg = map(str, runs)
    image = str(write_digit(held_out, 0, tmp_path / "digit.png"))
    out = tmp_path / "out"
    cases = [
        ([diff, "--image", image, "--out", str(out / "m.png")],
         r"holds a diffusion run \(model.kind = 'denoiser'\), not a segmentation run .*`diffuse sample`, `diffuse edit`"
         r".*configs/segment_digits.toml"),
        ([seg, "--image", str(tmp_path / "missing.png"), "--out", str(out / "m.png")], r"missing.png does not exist"),
        ([seg, "--image", image, "--out", str(out / "m.jpg")], r"--out must end in .png .* or name a folder"),
        ([seg, "--image", image, "--image", image, "--out", str(out / "m.png")],
         r"one mask file, and 2 images were given; give a folder for several"),
        ([seg, "--image", image, "--image", image, "--out", str(out)], r"two --image files are named digit"),
    ]
    for argv, message in cases:
        assert main(["segment", *argv, "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("diffuse segment: error: ") and re.search(message, err), err
        assert not out.exists()  # nothing written


# --- diffuse eval --metric miou ----------------------------------------------------------------------------------
def test_eval_prints_and_records_the_runs_own_miou(runs, evaluated, capsys):
    seg = runs[1]
    assert main(["eval", str(seg), "--device", "cpu"]) == 0  # miou: the default, and the only metric, of a segmenter
    out = capsys.readouterr().out
    assert f"miou: {evaluated['miou']:.6g}\n" in out
    for name, value in evaluated["iou"].items():
        assert f"\n  {name}: {value:.6g}\n" in out
    record = last_record(seg)
    assert record["metric"] == "miou" and record["miou"] == evaluated["miou"]
    assert record["iou"] == evaluated["iou"] and record["images"] == 20 and record["step"] == 30


def test_a_labelled_folder_of_the_held_out_images_scores_the_same(runs, model, held_out, evaluated, tmp_path, capsys):
    folder = tmp_path / "labelled"
    (folder / "masks").mkdir(parents=True)
    for k in range(len(held_out)):  # images as 8-bit PNGs, masks as palette PNGs, in the held-out order
        write_digit(held_out, k, folder / "images" / f"{k:03d}.png")
        mask = Image.fromarray(held_out.masks[k].numpy().astype(np.uint8), "L")
        mask.putpalette([v for c in range(model.num_classes) for v in (c, c, c)])  # mode "P": the indices are the labels
        mask.save(folder / "masks" / f"{k:03d}.png")
    (folder / "classes.txt").write_text("\n".join(model.class_names) + "\n")
    assert main(["eval", str(runs[1]), "--metric", "miou", "--real", str(folder), "--device", "cpu"]) == 0
    assert f"miou: {evaluated['miou']:.6g}\n" in capsys.readouterr().out
    record = last_record(runs[1])
    assert record["data"] == str(folder) and record["images"] == len(held_out)
    assert record["miou"] == evaluated["miou"] and record["pixel_accuracy"] == evaluated["pixel_accuracy"]


def test_eval_refuses_metrics_that_do_not_apply(runs, capsys):
    diff, seg = map(str, runs)
    cases = [
        (["eval", diff, "--metric", "miou"], r"is a diffusion run: pass --metric fid, kid, is, pr, nll or vlb "
                                             r"\(recon measures autoencoder runs, miou segmentation runs\)"),
        (["eval", seg, "--metric", "fid"], r"--metric fid does not apply to a segmentation run, which measures "
                                           r"--metric miou"),
        (["eval", seg, "--sampler", "ddim"], r"--sampler does nothing for a segmentation run"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("diffuse eval: error: ") and re.search(message, err), err
        assert not (runs[0] / "eval.json").exists()


# --- the web page's Segment tab ----------------------------------------------------------------------------------
def test_the_segment_tab_shows_what_the_command_line_writes(runs, model, held_out, tmp_path):
    pytest.importorskip("gradio")
    from diffuse.app.webui import build_app, segment_upload  # after the skip: without Gradio there is no page

    diff, seg = map(str, runs)
    app = build_app([diff, seg], device="cpu")
    ids = {getattr(c, "elem_id", None) for c in app.blocks.values()}
    assert {"tab-sample", "tab-edit", "tab-segment", "g-table", "g-figure"} <= ids
    assert app.webui.models.runs == [diff] and app.webui.models.segmenters == [seg]
    image = write_digit(held_out, 3, tmp_path / "upload.png")
    folder = app.webui.job_folder("segment")
    r = segment_upload(app.webui.models, seg, str(image), folder)
    x, labels, uncertainty, _ = labels_of(model, image)
    result = Segmented(x, labels, uncertainty, model.class_names)
    np.testing.assert_array_equal(np.asarray(Image.open(folder / "upload_mask.png")), labels.numpy())
    assert r["files"] == [str(folder / "upload_mask.png"), str(folder / "upload_mask_overlay.png")]
    assert r["figure"] == r["files"][1] and Image.open(r["figure"]).width > 2.5 * PANEL_INCHES * DPI
    assert r["table"] == [[name, f"{share:.1%}", f"{u:.4g}"] for name, share, u in result.shares()]
    assert r["status"] == f"upload.png: {result.summary()}"
    assert r["command"] == f"diffuse segment {seg} --image upload.png --out upload_mask.png" and r["notes"] == []
    # the command line, run beside the upload, writes the same mask
    argv = r["command"].split()[1:]
    argv[argv.index("upload.png")] = str(image)
    argv[-1] = str(tmp_path / "cli_mask.png")
    assert main(argv) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "cli_mask.png")),
                                  np.asarray(Image.open(folder / "upload_mask.png")))
    # bad input: a message on the page, naming the problem
    with pytest.raises(ValueError, match="no image: upload an image file"):
        segment_upload(app.webui.models, seg, None, folder)
    (tmp_path / "notes.png").write_text("not an image\n")
    with pytest.raises(ValueError, match="notes.png is not a readable image"):
        segment_upload(app.webui.models, seg, str(tmp_path / "notes.png"), folder)
    with pytest.raises(ValueError, match="holds a diffusion run .*not a segmentation run"):
        segment_upload(app.webui.models, diff, str(image), folder)
    handler = next(f.fn for f in app.fns.values() if getattr(f, "name", "") == "segment")
    import gradio

    with pytest.raises(gradio.Error, match="no image: upload an image file"):
        list(handler(seg, None))  # (a generator: it waits its turn on the device first)
    assert not app.webui.device_lock.locked() and len(app.webui.queue) == 0  # the failed job left the queue
