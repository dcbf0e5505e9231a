"""KID, IS, precision/recall against independent computations; `diffuse eval`; hybrid and L_vlb training."""

import json

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from diffuse import metrics
import diffuse.train as train_mod
from diffuse.app.cli import main
from diffuse.config import apply_overrides, load_config
from diffuse.train import Trainer

from test_cli import TINY, _sets


def feats(n, d=8, shift=0.0, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def test_mmd2_unbiased_matches_a_loop():
    a, b = feats(12, 3), feats(9, 3, shift=0.5, seed=1)
    k = lambda x, y: (float(x @ y) / 3 + 1) ** 3  # noqa: E731
    xx = sum(k(a[i], a[j]) for i in range(12) for j in range(12) if i != j) / (12 * 11)
    yy = sum(k(b[i], b[j]) for i in range(9) for j in range(9) if i != j) / (9 * 8)
    xy = sum(k(a[i], b[j]) for i in range(12) for j in range(9)) / (12 * 9)
    assert metrics.mmd2_unbiased(a, b) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_kid_is_unbiased_and_orders_distributions():
    """Same distribution: KID's mean is ~0 (it can go negative; FID cannot); a shift makes it grow."""
    same = [metrics.kid_from_features(feats(200, seed=s), feats(200, seed=100 + s), subsets=20, subset_size=100)[0]
            for s in range(20)]
    assert abs(np.mean(same)) < 3 * np.std(same) / np.sqrt(len(same)) + 1e-4
    assert min(same) < 0 < max(same)
    near = metrics.kid_from_features(feats(300), feats(300, shift=0.3, seed=1), subsets=10, subset_size=200)
    far = metrics.kid_from_features(feats(300), feats(300, shift=1.0, seed=1), subsets=10, subset_size=200)
    assert 0 < near[0] < far[0] and near[1] > 0


class FixedClassifier(torch.nn.Module):
    """logits = the first `k` pixels of the image, scaled: a classifier whose outputs the test chooses."""

    def __init__(self, k):
        super().__init__()
        self.k, self.scale = k, torch.nn.Parameter(torch.tensor(50.0))

    def forward(self, x):
        return x.flatten(1)[:, :self.k] * self.scale


def test_inception_score_closed_forms():
    k = 5
    onehot = torch.full((100, 1, 1, 8), -1.0)
    onehot[torch.arange(100), 0, 0, torch.arange(100) % k] = 1.0  # confident, classes equally often
    mean, std = metrics.inception_score(onehot, FixedClassifier(k), splits=4)
    assert mean == pytest.approx(k, rel=1e-6) and std == pytest.approx(0, abs=1e-6)
    same = torch.full((100, 1, 1, 8), -1.0)
    same[:, 0, 0, 2] = 1.0  # one class only: IS = 1
    assert metrics.inception_score(same, FixedClassifier(k), splits=2)[0] == pytest.approx(1.0, rel=1e-6)


def test_precision_recall_match_sklearn_neighbours():
    real, fake = feats(150, 4), feats(120, 4, shift=0.7, seed=3)
    p, r = metrics.precision_recall_from_features(real, fake, k=3)

    def reference(ref, other):
        radius = NearestNeighbors(n_neighbors=4).fit(ref).kneighbors(ref)[0][:, -1]
        dist = np.linalg.norm(other[:, None, :] - ref[None], axis=-1)
        return float((dist <= radius[None]).any(1).mean())

    assert p == pytest.approx(reference(real.numpy(), fake.numpy()))
    assert r == pytest.approx(reference(fake.numpy(), real.numpy()))
    assert metrics.precision_recall_from_features(real, real, k=3) == (1.0, 1.0)
    assert metrics.precision_recall_from_features(real, feats(50, 4, shift=100.0), k=3) == (0.0, 0.0)


@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hybrid") / "run"
    assert main(["train", "configs/mnist.toml", *_sets(TINY), "--set", "model.learned_variance=true",
                 "--set", "train.loss=hybrid", "--set", "model.prediction=eps", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("metric,key", [("fid", "fid"), ("kid", "kid"), ("is", "inception_score"), ("pr", "precision"),
                                        ("vlb", "bits_per_dim"), ("nll", "bits_per_dim")])
def test_eval_prints_and_records_every_metric(hybrid_run, metric, key, capsys):
    extra = {"vlb": ["--vlb-samples", "4"], "nll": ["--rtol", "1e-2"]}.get(metric, ["--steps", "3"])
    n = "4" if metric in ("vlb", "nll") else "40"
    assert main(["eval", str(hybrid_run), "--metric", metric, "--n", n, *extra]) == 0
    assert key in capsys.readouterr().out
    records = json.loads((hybrid_run / "eval.json").read_text())
    assert records[-1]["metric"] == metric and np.isfinite(records[-1][key])


def test_vlb_training_resumes_exactly_with_its_importance_state(tmp_path):
    cfg = apply_overrides(load_config("configs/mnist.toml"), TINY + ["train.loss=vlb", "train.loss_weighting=none", "model.prediction=eps",
                                                                     "train.steps=6", "train.checkpoint_every=3"])
    straight = Trainer(cfg, tmp_path / "a", progress=False)
    straight.fit()
    half = apply_overrides(cfg, ["train.steps=3"])
    Trainer(half, tmp_path / "b", progress=False).fit()
    resumed = Trainer(cfg, tmp_path / "b", progress=False)
    assert int(resumed.objective.importance.count.sum()) == 3 * 16
    resumed.fit()
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    torch.testing.assert_close(straight.objective.importance.history, resumed.objective.importance.history)


def test_hybrid_loss_needs_a_learned_variance(tmp_path, capsys):
    assert main(["train", "configs/mnist.toml", *_sets(TINY), "--set", "train.loss=hybrid", "--out", str(tmp_path / "x")]) == 2
    assert "model.learned_variance = true" in capsys.readouterr().err


def test_vlb_decreases_during_training(tmp_path):
    """The bound (all T = 100 terms) of a tiny model on the 8x8 digits: before training, after 100 and 300 steps."""
    from diffuse.likelihood import vlb_bits_per_dim
    from diffuse.kinds.diffusion import build_denoiser

    cfg = apply_overrides(load_config("configs/mnist.toml"), TINY + ["model.prediction=eps", "schedule.T=100",
                                                                     "train.lr=2e-3", "train.checkpoint_every=1000"])
    trainer = Trainer(cfg, tmp_path, progress=False)
    x0 = torch.stack([trainer.dataset[i][0] for i in range(8)])

    def bound():
        den = build_denoiser(trainer.cfg, trainer.model.eval())
        out = float(vlb_bits_per_dim(den, x0, samples=None, generator=torch.Generator().manual_seed(0))["total"].mean())
        trainer.model.train()
        return out

    values = [bound()]
    for steps in (100, 300):
        trainer.cfg.train.steps = steps
        trainer.fit()
        values.append(bound())
    assert values[0] > values[1] > values[2], values


def test_feature_network_by_name(tmp_path):
    assert isinstance(train_mod.feature_network("torch.nn:Identity"), torch.nn.Identity)  # a class: called with no arguments
    (tmp_path / "feats.py").write_text("import torch\nnet = torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Flatten())\n")
    net = train_mod.feature_network(f"{tmp_path / 'feats.py'}:net")
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert metrics.extract_features(x, net).shape == (6, 49)
    for spec, match in [("nodots", "expected digits, inception"), ("no.such.module:f", "cannot import module"),
                        ("torch.nn:NoSuchThing", "no attribute"), ("math:pi", "not an nn.Module"),
                        (f"{tmp_path / 'missing.py'}:net", "does not exist")]:
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            train_mod.feature_network(spec)


def _capture(monkeypatch, name):
    """Wrap metrics.<name> to keep its arguments and result."""
    calls, original = [], getattr(metrics, name)

    def spy(*args, **kwargs):
        calls.append((args, original(*args, **kwargs)))
        return calls[-1][1]

    monkeypatch.setattr(metrics, name, spy)
    return calls, original


def test_eval_uses_the_named_feature_space(hybrid_run, tmp_path, monkeypatch, capsys):
    """--features FILE.py:ATTR: the recorded FID is the FID, in that module's features, of the real digits and
    of samples rounded to 8 bits; a missing Inception file is a clear error."""
    (tmp_path / "pool.py").write_text("import torch\n\nclass Pool(torch.nn.Module):\n"
                                      "    def forward(self, x):\n        return torch.nn.functional.avg_pool2d(x, 7).flatten(1)\n\n"
                                      "def make():\n    return Pool()\n")
    spec = f"{tmp_path / 'pool.py'}:make"
    calls, fid = _capture(monkeypatch, "fid")
    assert main(["eval", str(hybrid_run), "--metric", "fid", "--n", "40", "--steps", "3", "--features", spec]) == 0
    record = json.loads((hybrid_run / "eval.json").read_text())[-1]
    (real, fake, net), value = calls[-1]
    assert type(net).__name__ == "Pool" and record["features"] == spec and record["fid"] == value > 0
    assert real.shape == fake.shape and len(real) == 40
    levels = (fake + 1) * 127.5
    assert (levels - levels.round()).abs().max() < 1e-4  # 8-bit levels, as the real digits
    assert value == fid(real, fake, torch.nn.AvgPool2d(7))
    capsys.readouterr()
    assert main(["eval", str(hybrid_run), "--metric", "fid", "--n", "40", "--features", f"inception:{tmp_path / 'none.pth'}"]) != 0
    assert "does not exist; download it once" in capsys.readouterr().err


def test_eval_with_inception_weights_from_a_file(hybrid_run, tmp_path, monkeypatch):
    from diffuse.nets.inception import FIDInceptionV3

    torch.manual_seed(0)
    path = tmp_path / "inception.safetensors"
    import safetensors.torch

    safetensors.torch.save_file({k: v.contiguous() for k, v in FIDInceptionV3().state_dict().items()}, path)
    calls, inception_score = _capture(monkeypatch, "inception_score")
    with pytest.warns(UserWarning, match="not the standard FID Inception file"):
        assert main(["eval", str(hybrid_run), "--metric", "is", "--n", "20", "--steps", "2",
                     "--features", f"inception:{path}"]) == 0
    record = json.loads((hybrid_run / "eval.json").read_text())[-1]
    (fake, net), value = calls[-1]
    assert isinstance(net, FIDInceptionV3) and record["features"] == f"inception:{path}"
    assert (record["inception_score"], record["inception_score_std"]) == value == inception_score(fake, net)


def test_feature_networks_without_parameters_or_with_a_features_trunk():
    x = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert metrics.inception_score(x, torch.nn.Flatten())[0] > 1  # no parameters: runs on the CPU

    class Trunk(torch.nn.Module):  # torchvision's VGG layout: `features` is a conv trunk, forward pools it
        batch_size = None  # not a usable batch size: ignored

        def __init__(self):
            super().__init__()
            self.features = torch.nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return self.features(x).mean((2, 3))

    assert metrics.extract_features(x, Trunk()).shape == (20, 4)
    with pytest.warns(UserWarning, match="pool the network's output"):
        metrics.extract_features(torch.zeros(2, 1, 91, 91), torch.nn.Flatten())


class _Projection(torch.nn.Module):
    """A fixed random feature map; num_features tells torchmetrics its width (it would probe with a 299x299 image)."""

    num_features = 12

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(64, self.num_features)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        return torch.tanh(self.proj(torch.nn.functional.avg_pool2d(x, 2).flatten(1)))


def test_fid_and_kid_agree_with_torchmetrics():
    """torchmetrics (a reference implementation) on the same images and the same custom feature network."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    g = torch.Generator().manual_seed(1)
    real = torch.rand(300, 1, 16, 16, generator=g) * 2 - 1
    fake = (torch.rand(200, 1, 16, 16, generator=g) * 1.6 - 0.9).clamp(-1, 1)
    net = _Projection().eval()
    ref_fid = FrechetInceptionDistance(feature=net, normalize=True)
    ref_fid.update(real, real=True)
    ref_fid.update(fake, real=False)
    ours = metrics.fid(real, fake, net)
    assert ours > 0.1
    assert abs(ours - float(ref_fid.compute())) < 1e-6 * ours
    # KID on equal-size sets with one subset of that size: torchmetrics' random subset is then the whole set
    ref_kid = KernelInceptionDistance(feature=net, normalize=True, subsets=1, subset_size=200)
    ref_kid.update(real[:200], real=True)
    ref_kid.update(fake, real=False)
    f_real, f_fake = metrics.extract_features(real[:200], net), metrics.extract_features(fake, net)
    assert metrics.mmd2_unbiased(f_real, f_fake) == pytest.approx(float(ref_kid.compute()[0]), rel=1e-5)


SAMPLE_RECORD = {"metric", "step", "n", "n_real", "n_fake", "seed", "sampler", "steps", "spacing", "guidance",
                 "guidance_interval", "labels", "prompts", "mixed_precision", "compiled", "dtype", "features", "feature_network", "date"}
"""What changes a sample metric's number, in every record of eval.json (besides the metric's own values)."""


def test_a_sample_record_carries_what_changes_its_number(hybrid_run):
    """Precision/recall: the record names the network's dtype apart from the metric's precision (once one key)."""
    assert main(["eval", str(hybrid_run), "--metric", "pr", "--n", "40", "--sampler", "ddim", "--steps", "3",
                 "--spacing", "leading", "--seed", "2", "--mixed-precision", "no", "--batch-size", "16"]) == 0
    record = json.loads((hybrid_run / "eval.json").read_text())[-1]
    assert set(record) == SAMPLE_RECORD | {"precision", "recall"}
    assert {k: v for k, v in record.items() if k not in ("date", "precision", "recall")} == {
        "metric": "pr", "step": 4, "n": 40, "n_real": 40, "n_fake": 40, "seed": 2, "sampler": "ddim", "steps": 3,
        "spacing": "leading", "guidance": 0.0, "guidance_interval": [], "labels": "none (not class-conditional)",
        "prompts": "none (not text-conditional)", "mixed_precision": "no", "compiled": False, "dtype": "float32", "features": "digits",
        "feature_network": train_mod.digit_classifier_folder().name}
    assert 0 <= record["precision"] <= 1 and 0 <= record["recall"] <= 1


def test_a_guided_class_conditional_record_names_its_guidance_and_labels(tmp_path, monkeypatch):
    run = tmp_path / "cond"
    assert main(["train", "configs/mnist_cond.toml", *_sets(TINY), "--out", str(run)]) == 0
    (tmp_path / "pool.py").write_text("import torch\nnet = torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Flatten())\n")
    assert main(["eval", str(run), "--metric", "fid", "--n", "20", "--steps", "2", "--guidance", "1.5",
                 "--guidance-interval", "0.1,5", "--features", f"{tmp_path / 'pool.py'}:net"]) == 0
    record = json.loads((run / "eval.json").read_text())[-1]
    assert set(record) == SAMPLE_RECORD - {"feature_network"} | {"fid"}  # a feature network of the user's: its spec
    assert (record["guidance"], record["guidance_interval"], record["labels"]) == (1.5, [0.1, 5.0], "classes 0-9 in turn")
    assert (record["sampler"], record["steps"], record["step"]) == ("dpmpp-2m", 2, 4)  # the run's [sample] sampler


def test_eval_shows_progress_of_its_sampling_and_feature_passes(hybrid_run, capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert main(["eval", str(hybrid_run), "--metric", "kid", "--n", "40", "--sampler", "ddim", "--steps", "3",
                 "--batch-size", "20"]) == 0
    err = capsys.readouterr().err
    assert "sampling (ddim): 100%" in err and "6/6" in err  # 3 steps in each of 2 chunks
    assert "features: 100%" in err and "80/80" in err  # 40 real and 40 generated images


def test_likelihood_records_name_their_labels_and_step(hybrid_run):
    assert main(["eval", str(hybrid_run), "--metric", "vlb", "--n", "4", "--vlb-samples", "2", "--seed", "1"]) == 0
    record = json.loads((hybrid_run / "eval.json").read_text())[-1]
    assert {k: record[k] for k in ("metric", "step", "n", "n_real", "seed", "labels", "prompts", "dtype")} == {
        "metric": "vlb", "step": 4, "n": 4, "n_real": 4, "seed": 1, "labels": "none (not class-conditional)",
        "prompts": "none (not text-conditional)", "dtype": "float32"}
