"""The contract every kind of model keeps with the one Trainer (kinds.KINDS): build, one step, save, resume, one
more step equals two straight steps, bit for bit; and two processes under gloo DDP end where one process ends.

CONFIGS has a tiny config for every kind, and a test refuses a kind without one, so each future kind gets exact
resume and DDP checked by adding one row. This file is also the DDP worker (as tests/test_ddp.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import start_workers, wait_workers

WORLD = 2
COMMON = ["data.source=folder", "data.image_size=8", "data.channels=1", "train.batch_size=8", "train.lr=1e-3",
          "train.warmup_steps=1", "train.log_every=1", "train.sample_every=0", "train.checkpoint_every=1",
          "train.mixed_precision=no"]
UNET = ["model.channels=8", "model.channel_mult=[1, 2]", "model.num_res_blocks=1", "model.norm_groups=4",
        "model.attention_resolutions=[4]", "model.dropout=0.1", "train.ema_decay=0.9", "schedule.T=100"]
CONFIGS = {  # kind -> the overrides of a tiny run of it on the 8x8 two-class image folder
    "denoiser": UNET + ["model.class_conditional=true", "train.condition_dropout={label = 0.3}", "train.hflip=true",
                        "train.posthoc_ema=[0.05, 0.1]"],
    "classifier": UNET + ["model.kind=classifier"],
    "autoencoder": ["model.kind=autoencoder", "autoencoder.channels=[8, 16]", "autoencoder.latent_channels=2",
                    "autoencoder.num_res_blocks=1", "autoencoder.norm_groups=4", "autoencoder.disc_start=1",
                    "autoencoder.disc_channels=8", "autoencoder.disc_layers=1"],
    "digit_classifier": ["model.kind=digit_classifier", "data.source=digits"],  # ten classes: sklearn's 8x8 digits
    # the pixel-and-position baseline: a diffusion source run would have to be trained before the rows are built (and
    # before the DDP workers start), so the row reads no run; the ensemble, its BatchNorm and the pixel batches are the
    # same code whatever the features (tests/test_segmentation.py trains one on a diffusion run's features)
    "segmenter": ["model.kind=segmenter", "data.source=digits", "segment.features=pixels", "segment.members=2",
                  "segment.hidden=[8, 4]", "segment.train_images=4", "segment.test_images=8", "train.batch_size=64"],
    "diffae": UNET + ["model.kind=diffae", "model.semantic_dim=4", "train.hflip=true"],
    # the second runs read the codes of SOURCE, a 2-step diffusion autoencoder the `images` fixture trains first
    "diffae_prior": ["model.kind=diffae_prior", "semantic.hidden=8", "semantic.layers=3", "schedule.kind=constant",
                     "schedule.beta_end=0.05", "schedule.T=100", "train.ema_decay=0.9", "train.loss_norm=l1"],
    "diffae_classifier": ["model.kind=diffae_classifier", "semantic.target=label"],
    # captioned digits: ten captions, so every batch repeats some (the soft targets); two ranks gather with gradient
    "clip": ["model.kind=clip", "data.source=digits", "model.channels=8", "model.channel_mult=[1, 2]",
             "model.num_res_blocks=1", "model.norm_groups=4", "model.attention_resolutions=[4]",
             "model.text_encoder=chars", "model.max_tokens=24", "clip.dim=8", "clip.text_width=8"],
    # the unCLIP prior on the embeddings of CLIP_SOURCE, a 2-step CLIP of the row above the `images` fixture trains first
    "unclip_prior": ["model.kind=unclip_prior", "model.prediction=x0", "unclip.width=8", "unclip.layers=2", "unclip.heads=2",
                     "unclip.text_dropout=0.3", "schedule.T=100", "train.ema_decay=0.9"],
}
SEMANTIC = ("diffae_prior", "diffae_classifier")  # no [data] of their own: the codes of the source run's data
SOURCE = "diffae_source"  # beside the images folder
CLIP_SOURCE = "clip_source"  # beside the images folder: the CLIP whose embeddings the unCLIP prior diffuses
VARIANTS = {"autoencoder_vq": ("autoencoder", ["autoencoder.kind=vq", "autoencoder.codebook_size=16",
                                               "autoencoder.dead_code_threshold=0.5"]),  # restarts draw too
            # an FID on rank 0 mid-run, which may first train the digit classifier (the DDP workers' cache is empty)
            "denoiser_fid": ("denoiser", ["train.fid_every=1", "train.fid_samples=8", "sample.steps=2"]),
            # a video denoiser (kinds.VIDEO_KINDS): masked conditioning and joint image examples, both drawn per step
            "video": ("denoiser", ["model.class_conditional=false", "train.condition_dropout={}", "data.source=moving_digits",
                                   "data.frames=4", "data.crops=16", "data.digit_size=4", "data.velocity=1",
                                   "model.video=true", "model.video_observed=true", "video.max_observed=2",
                                   "video.p_images=0.25"]),
            # the same on 4 frames of windows of 8 (video.max_span): the frame subsets are drawn per step too
            "video_span": ("denoiser", ["model.class_conditional=false", "train.condition_dropout={}",
                                        "data.source=moving_digits", "data.frames=4", "data.crops=16", "data.digit_size=4",
                                        "data.velocity=1", "model.video=true", "model.video_observed=true",
                                        "video.max_observed=2", "video.p_images=0.25", "video.max_span=8"]),
            # GLIDE's noised CLIP: x_t of the schedule at a drawn t (a share at t = 0)
            "clip_noised": ("clip", ["clip.noise_aware=true", "schedule.T=100"]),
            # unCLIP's decoder (kinds/unclip.py): z_i of each batch by CLIP_SOURCE, a 1-step CLIP on the captioned 8x8
            # digits the `images` fixture trains first, dropped per example
            "unclip_decoder": ("denoiser", ["model.class_conditional=false", "train.condition_dropout={image_embed = 0.3}",
                                            "model.image_embed_dim=8", "model.context_dim=8",
                                            "model.cross_attention_resolutions=[4]", "unclip.clip=CLIP_SOURCE"])}
CLIP_SOURCE = "clip_source"  # beside the images folder


def config(images: Path, kind: str, steps: int, extra=()):
    from diffuse.config import RunConfig, apply_overrides

    own = [*CONFIGS[kind], *extra]
    if kind in SEMANTIC:
        common = [o for o in COMMON if not o.startswith("data.")]
        return apply_overrides(RunConfig(), [*common, f"semantic.run={json.dumps(str(images.parent / SOURCE))}",
                                             f"train.steps={steps}", *own])
    if kind == "unclip_prior":
        common = [o for o in COMMON if not o.startswith("data.")]
        return apply_overrides(RunConfig(), [*common, f"unclip.clip={json.dumps(str(images.parent / CLIP_SOURCE))}",
                                             f"train.steps={steps}", *own])
    own = [f"unclip.clip={json.dumps(str(images.parent / CLIP_SOURCE))}" if o == "unclip.clip=CLIP_SOURCE" else o
           for o in own]
    path = [] if any(o.startswith("data.source=") for o in own) else [f"data.path={json.dumps(str(images))}"]
    return apply_overrides(RunConfig(), [*COMMON, *path, f"train.steps={steps}", *own])


def cases():
    return {**{k: (k, []) for k in CONFIGS}, **VARIANTS}


def make_images(folder: Path, n: int = 24) -> Path:
    """n random 8x8 grayscale PNGs in two class folders (a labelled folder dataset)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        (folder / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(folder / str(i % 2) / f"{i:03d}.png")
    return folder


def weights(run: Path) -> dict[str, torch.Tensor]:
    """Every saved tensor of a run's newest checkpoint but the RNG states and the run's step counters, by group."""
    from diffuse.checkpoint import load_checkpoint

    c = load_checkpoint(run)
    out = {}
    for group, tensors in c.tensors.items():
        for name, v in tensors.items():
            if not (group == "state" and name.startswith("rng.")):
                out[f"{group}/{name}"] = v
    return out


# --- the DDP worker -------------------------------------------------------------------------------------------------
def _worker(images: Path, out: Path) -> None:
    from diffuse import distributed
    from diffuse.train import Trainer

    for name, (kind, extra) in cases().items():  # one process group for all (train() would close it after each)
        Trainer(config(images, kind, 2, extra), out / name, progress=False).fit()
    distributed.close()


def _launch(images: Path, out: Path, timeout: float = 300) -> None:
    logs = [out / f"rank{r}.log" for r in range(WORLD)]
    # an empty cache: rank 0 trains the digit classifier alone mid-run, the other waits
    wait_workers(start_workers([__file__, str(images), str(out)], logs, DIFFUSE_CACHE=str(out / "cache")), logs, timeout)


# --- the tests ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The image folder, and beside it SOURCE, the diffusion autoencoder whose codes the second runs train on, and
    CLIP_SOURCE, the CLIP whose embeddings the unCLIP prior diffuses and unCLIP's decoder takes."""
    from diffuse.train import train

    folder = make_images(tmp_path_factory.mktemp("data") / "images")
    train(config(folder, "diffae", 2), folder.parent / SOURCE, progress=False)
    train(config(folder, "clip", 2), folder.parent / CLIP_SOURCE, progress=False)
    return folder


@pytest.fixture(scope="module")
def straight(tmp_path_factory, images):
    """Each case trained 2 steps in one go, in this process."""
    from diffuse.train import train

    base = tmp_path_factory.mktemp("straight")
    for name, (kind, extra) in cases().items():
        train(config(images, kind, 2, extra), base / name, progress=False)
    return base


def test_every_kind_has_a_contract_config():
    from diffuse.kinds import KINDS, VIDEO_KINDS

    assert set(KINDS) == set(CONFIGS)
    assert set(VIDEO_KINDS) <= {kind for kind, extra in VARIANTS.values() if "model.video=true" in extra}


@pytest.mark.parametrize("name", list(cases()))
def test_resume_after_one_step_equals_two_straight_steps(tmp_path, images, straight, name):
    from diffuse.train import Trainer

    kind, extra = cases()[name]
    cut = tmp_path / "cut"
    Trainer(config(images, kind, 1, extra), cut, progress=False).fit()
    resumed = Trainer(config(images, kind, 2, extra), cut, progress=False)
    assert resumed.step == 1
    resumed.fit()
    want, got = weights(straight / name), weights(cut)
    assert got.keys() == want.keys()
    moved = [k for k in want if k.startswith("model/") and want[k].is_floating_point()]
    assert moved, "the case trains no weights"
    for key, w in want.items():
        assert torch.equal(got[key], w), f"{name}: {key} differs after resume"


@pytest.mark.slow
def test_two_processes_end_where_one_ends(tmp_path, images, straight):
    _launch(images, tmp_path)
    for name in cases():
        want, got = weights(straight / name), weights(tmp_path / name)
        assert got.keys() == want.keys(), name
        for key, w in want.items():
            if key.startswith("state/"):  # optimizer moments and counters: compared through the weights they give
                continue
            # Adam moves a weight by up to lr per step whatever its gradient's size, so a gradient that is 0 up to
            # rounding (the discriminator's GroupNorm bias: -1.9e-9 against ~1e-3 for its neighbours), summed in
            # another order across processes, may move its weight by up to lr: allowed for one element or 1% of a
            # tensor, every other element equal up to float32 rounding
            off = ~torch.isclose(got[key].double(), w.double(), rtol=1e-5, atol=1e-6)
            if key.endswith("self_attn.in_proj_bias"):  # torch attention's key bias (the middle third): its gradient is
                d = off.numel() // 3                     # 0 exactly (a softmax ignores a shift), rounding's only (the chars encoder)
                off[d:2 * d] = False
            assert int(off.sum()) <= max(1, off.numel() // 100), f"{name} {key}: {int(off.sum())} of {off.numel()} differ"
            assert float((got[key].double() - w.double()).abs().max()) <= 2 * 1e-3 * 1.01, f"{name} {key}"


class Vectors:
    """A dataset of the protocol without a `shape` attribute: 8x8 one-channel images made of noise, unlabelled."""

    num_classes, condition_keys = 0, ()

    def __init__(self, side: int = 8):
        self.x = torch.randn(16, 1, side, side, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, idx):
        return self.x[idx], {}


def test_a_dataset_states_its_shape_or_shows_it(tmp_path, images):
    from diffuse.data import shape_of
    from diffuse.train import Trainer

    assert shape_of(Vectors()) == (1, 8, 8)  # read off its first example
    cfg = config(images, "denoiser", 1, ["model.class_conditional=false", "train.condition_dropout={}"])
    trainer = Trainer(cfg, tmp_path / "a", progress=False, dataset=Vectors())
    assert trainer.space.shape == (1, 8, 8)
    with pytest.raises(ValueError, match=r"the data yield examples of shape \(1, 16, 16\) and the config's network takes "
                                         r"\(1, 8, 8\)"):
        Trainer(cfg, tmp_path / "b", progress=False, dataset=Vectors(16))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
