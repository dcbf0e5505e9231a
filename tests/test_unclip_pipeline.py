"""unCLIP's pipeline folder (FOLDER/unclip.toml: tasks/unclip.py read_pipeline, check_pipeline; app/requests.py):
`diffuse sample PIPE --prompt ...` is the prior's best-of-k embeddings (kinds.unclip.sample_image_embeddings) decoded by
the decoder with image_embed = z_i, bit for bit; the folder's defaults are the flags'; the edits on PIPE are the edits on
its decoder, bit for bit; a pipeline whose runs read different CLIP checkpoints, and every bad input, is refused by name;
Plan.argv round-trips."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from diffuse.config import RunConfig, apply_overrides, load_config, save_config
from test_unclip import PRIOR
from test_unclip_decoder import CLIP_SET, decoder_set

PROMPT = "a red circle"


def write_pipeline(folder, prior="prior", decoder="decoder", **defaults):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"prior = {json.dumps(str(prior))}", f"decoder = {json.dumps(str(decoder))}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in defaults.items()]
    (folder / "unclip.toml").write_text("\n".join(lines) + "\n")
    return folder


def train_pipeline(root, clip_steps: int = 1, prior_steps: int = 2, decoder_steps: int = 2):
    """A CLIP of 16x16 shapes (width 8), a prior and a decoder on it, and root/pipe/unclip.toml naming the two (relative
    to the folder for the prior, absolute for the decoder), with two images root/a.png, root/b.png of the data."""
    from diffuse.train import Trainer
    from diffuse.visualize import save_grid

    Trainer(apply_overrides(RunConfig(), [*CLIP_SET, f"train.steps={clip_steps}"]), root / "clip", progress=False).fit()
    clip = json.dumps(str(root / "clip"))
    prior = [*PRIOR, f"unclip.clip={clip}", "unclip.width=16", "train.batch_size=16", f"train.steps={prior_steps}",
             f"train.checkpoint_every={prior_steps}", "sample.steps=3"]
    Trainer(apply_overrides(RunConfig(), prior), root / "pipe" / "prior", progress=False).fit()
    trainer = Trainer(apply_overrides(RunConfig(), decoder_set(root / "clip", f"train.steps={decoder_steps}")),
                      root / "decoder", progress=False)
    trainer.fit()
    x, _ = trainer.dataset.batch(torch.arange(2))
    save_grid(x[:1], root / "a.png")
    save_grid(x[1:], root / "b.png")
    write_pipeline(root / "pipe", "prior", root / "decoder")
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return train_pipeline(tmp_path_factory.mktemp("unclip_pipe"))


def sample_args(argv):
    from diffuse.app.cli import parser
    from diffuse.app.requests import SampleRequest

    return SampleRequest.from_args(parser().parse_args(["sample", *argv, "--out", "x.png"]))


def edit_args(argv):
    from diffuse.app.cli import parser
    from diffuse.app.requests import EditRequest

    return EditRequest.from_args(parser().parse_args(["edit", *argv, "--out", "x.png"]))


def test_sampling_the_pipeline_is_the_prior_then_the_decoder_by_hand_bit_for_bit(root):
    from diffuse.app.requests import execute, pipeline_decoder_seed, resolve
    from diffuse.generate import generate
    from diffuse.kinds.unclip import load_prior, sample_image_embeddings
    from diffuse.runs import open_run

    pipe = root / "pipe"
    req = sample_args([str(pipe), "--prompt", PROMPT, "--n", "3", "--steps", "3", "--guidance", "1.5",
                       "--prior-guidance", "0.5", "--best-of", "3", "--seed", "7"])
    plan = resolve(req)
    again = sample_args(plan.argv()[1:])
    assert plan.argv()[:2] == ["sample", str(pipe)] and again == plan.request == req
    assert resolve(again).argv() == plan.argv()  # Plan.argv round-trips
    result = execute(plan)

    z = sample_image_embeddings(load_prior(pipe / "prior"), [PROMPT] * 3, 0.5, best_of=3, seed=7)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))  # unit CLIP image embeddings
    assert not torch.equal(z[0], z[1])  # each image its own draw of z_i
    decoder = open_run(str(root / "decoder"))
    s = decoder.cfg.sample
    by_hand = generate(decoder.denoiser(), 3, (3, 16, 16), cond={"image_embed": z}, seed=pipeline_decoder_seed(7),
                       sampler=s.sampler, steps=3, spacing=s.spacing, eta=s.eta, variance=s.variance, guidance=1.5,
                       guidance_interval=tuple(s.guidance_interval) or None, clip=s.clip,
                       dynamic_threshold=s.dynamic_threshold, mixed_precision=s.mixed_precision)
    assert torch.equal(result.x, by_hand)
    assert result.calls == 2 * 3 + 2 * 3  # prior and decoder: 3 guided steps each, two calls a step (the n k draws at once)

    # the folder's defaults are the flags': the same pixels without them
    write_pipeline(root / "defaults", root / "pipe" / "prior", root / "decoder", prior_guidance=0.5, best_of=3)
    plain = sample_args([str(root / "defaults"), "--prompt", PROMPT, "--n", "3", "--steps", "3", "--guidance", "1.5",
                         "--seed", "7"])
    assert torch.equal(execute(resolve(plain)).x, by_hand)
    other = execute(resolve(dataclasses.replace(req, best_of=1))).x
    assert not torch.equal(other, by_hand)  # best-of picks among the draws: k = 1 keeps the first


def test_diffuse_sample_writes_the_pipeline_grid(root, tmp_path, capsys):
    from diffuse.app.cli import main
    from diffuse.app.requests import execute, resolve
    from diffuse.visualize import save_grid

    out = tmp_path / "grid.png"
    argv = [str(root / "pipe"), "--prompt", PROMPT, "--n", "2", "--steps", "2"]
    assert main(["sample", *argv, "--out", str(out)]) == 0
    assert "by the unCLIP pipeline" in capsys.readouterr().out
    save_grid(execute(resolve(sample_args(argv))).x, tmp_path / "want.png")
    assert out.read_bytes() == (tmp_path / "want.png").read_bytes()  # the command's grid is the plan's pixels


def test_the_edits_of_the_pipeline_are_its_decoder_edits_bit_for_bit(root):
    from diffuse.app.requests import execute, resolve

    pipe, decoder = str(root / "pipe"), str(root / "decoder")
    image, other = str(root / "a.png"), str(root / "b.png")
    for task, extra in [("variations", ["--n", "2"]),
                        ("interpolate", ["--to", other, "--n", "3", "--invert", "--encode-steps", "3"]),
                        ("textdiff", ["--from", "a red circle", "--to", "a blue circle", "--n", "2", "--encode-steps", "3"])]:
        argv = ["--image", image, "--steps", "3", "--seed", "3", *extra]
        plan = resolve(edit_args([task, pipe, *argv]))
        assert plan.argv()[:3] == ["edit", task, pipe]
        again = edit_args(plan.argv()[1:])
        assert again == plan.request and resolve(again).argv() == plan.argv()
        ours, theirs = execute(plan), execute(resolve(edit_args([task, decoder, *argv])))
        assert torch.equal(ours.x, theirs.x), task
        assert ours.calls == theirs.calls and len(ours.before) == len(theirs.before)


def test_a_pipeline_whose_runs_read_different_clips_is_refused_naming_both(root, tmp_path):
    from diffuse.app.requests import RequestError, resolve

    other_clip = tmp_path / "clip2"
    other_clip.mkdir()
    save_config(load_config(root / "clip" / "config.toml"), other_clip / "config.toml")
    for name, change in [("other_clip", {"clip": str(other_clip)}), ("other_step", {"clip_step": 99})]:
        fake = tmp_path / name
        fake.mkdir()
        cfg = load_config(root / "decoder" / "config.toml")
        save_config(dataclasses.replace(cfg, unclip=dataclasses.replace(cfg.unclip, **change)), fake / "config.toml")
        pipe = write_pipeline(tmp_path / f"pipe_{name}", root / "pipe" / "prior", fake)
        for req in (sample_args([str(pipe), "--prompt", PROMPT]),
                    edit_args(["variations", str(pipe), "--image", str(root / "a.png")])):
            with pytest.raises(RequestError) as e:
                resolve(req)
            msg = str(e.value)
            assert e.value.field == "run" and "share one CLIP checkpoint" in msg, msg
            assert str(root / "pipe" / "prior") in msg and str(fake) in msg  # both runs named
            assert str((root / "clip").resolve()) in msg  # and the CLIPs
            assert (str(other_clip) in msg) if name == "other_clip" else ("step 99" in msg and "step 1" in msg)


def test_bad_pipelines_and_requests_are_refused_by_name(root, tmp_path):
    from diffuse.app.requests import EditRequest, RequestError, SampleRequest, execute, resolve
    from diffuse.tasks.unclip import read_pipeline

    pipe = str(root / "pipe")

    def refused(field, req):
        with pytest.raises(RequestError) as e:
            resolve(req)
        assert e.value.field == field, str(e.value)
        return str(e.value)

    assert "--prompt" in refused("prompt", SampleRequest(run=pipe, n=2))
    assert "prompt 0" in refused("prompt", SampleRequest(run=pipe, n=2, prompt="  "))
    assert "prompt 0" in refused("prompt", SampleRequest(run=pipe, n=2, prompt=""))
    assert "--guidance" in refused("guidance", SampleRequest(run=pipe, prompt=PROMPT, guidance=math.nan))
    assert "--prior-guidance" in refused("prior_guidance", SampleRequest(run=pipe, prompt=PROMPT, prior_guidance=math.nan))
    assert "--prior-guidance" in refused("prior_guidance", SampleRequest(run=pipe, prompt=PROMPT, prior_guidance=-1.0))
    assert "--best-of" in refused("best_of", SampleRequest(run=pipe, prompt=PROMPT, best_of=0))
    assert "--best-of" in refused("best_of", SampleRequest(run=pipe, prompt=PROMPT, best_of=1.5))
    assert "--label" in refused("label", SampleRequest(run=pipe, prompt=PROMPT, label=1))
    assert "--frames" in refused("frames", SampleRequest(run=pipe, prompt=PROMPT, frames=4))
    assert "pipeline folder" in refused("best_of", SampleRequest(run=str(root / "decoder"), best_of=2))
    assert "no prior runs" in refused("prior_guidance", EditRequest(run=pipe, task="variations",
                                                                     image=str(root / "a.png"), prior_guidance=1.0))
    assert "its edits are variations" in refused("task", EditRequest(run=pipe, task="sdedit", image=str(root / "a.png"),
                                                                       strength=0.5))
    with pytest.raises(RequestError) as e:  # over the prior's CLIP tokenizer (64 tokens): named when it embeds it
        execute(resolve(SampleRequest(run=pipe, n=1, steps=1, prompt="a red circle " * 8)))
    assert e.value.field == "prompt" and "64" in str(e.value), str(e.value)
    with pytest.raises(SystemExit):  # the command line's parser refuses them first
        sample_args([pipe, "--prompt", PROMPT, "--best-of", "0"])
    # the folder itself
    with pytest.raises(FileNotFoundError, match="unclip.toml does not exist"):
        read_pipeline(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        resolve(SampleRequest(run=str(tmp_path), prompt=PROMPT))  # a folder with neither unclip.toml nor a run
    missing = write_pipeline(tmp_path / "missing", "nowhere", root / "decoder")
    with pytest.raises(FileNotFoundError, match=r"prior = 'nowhere' is .*nowhere, which holds no run"):
        resolve(SampleRequest(run=str(missing), prompt=PROMPT))
    for defaults, match in [({"best_of": 0}, "best_of"), ({"prior_guidance": -2}, "prior_guidance"),
                            ({"steps": 3}, r"unknown key\(s\) \['steps'\]")]:
        bad = write_pipeline(tmp_path / f"bad_{len(match)}", root / "pipe" / "prior", root / "decoder", **defaults)
        assert match.split("\\")[0] in refused("run", SampleRequest(run=str(bad), prompt=PROMPT))
    swapped = write_pipeline(tmp_path / "swapped", root / "decoder", root / "pipe" / "prior")
    assert "not an unCLIP prior" in refused("run", SampleRequest(run=str(swapped), prompt=PROMPT))
    clip_as_decoder = write_pipeline(tmp_path / "clip_decoder", root / "pipe" / "prior", root / "clip")
    assert "not unCLIP's decoder" in refused("run", SampleRequest(run=str(clip_as_decoder), prompt=PROMPT))
    (tmp_path / "toml").mkdir()
    (tmp_path / "toml" / "unclip.toml").write_text("prior = [")
    assert "not valid TOML" in refused("run", SampleRequest(run=str(tmp_path / "toml"), prompt=PROMPT))


def test_a_folder_that_is_neither_a_run_nor_a_pipeline_names_both_pipeline_files(tmp_path, capsys):
    from diffuse.app.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["sample", str(tmp_path / "empty"), "--prompt", "a red circle", "--out", str(tmp_path / "x.png")]) != 0
    err = capsys.readouterr().err
    assert "is not a run folder" in err and "unclip.toml" in err and "cascade.toml" in err
