import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffuse import metrics as M
from diffuse.nets import digits as D
from diffuse.data import DataConfig, load_dataset


# --- Frechet distance against closed forms ----------------------------------------------------
def _orthogonal(rng, d):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q


def _random_cov(rng, d, n=None):
    """np.cov of n standard-normal samples with a random linear map (rank-deficient when n <= d)."""
    x = rng.normal(size=(n or 3 * d, d)) @ rng.normal(size=(d, d))
    return np.cov(x, rowvar=False)


def _frechet_by_eigh(mu1, s1, mu2, s2):
    """Independent route: Tr((S1 S2)^1/2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), all roots from eigh of symmetric matrices."""
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(w.clip(0))) @ v.T
    tr_root = np.sqrt(np.linalg.eigvalsh(r1 @ s2 @ r1).clip(0)).sum()
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_root


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2, a, b = rng.normal(size=6), rng.normal(size=6), rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = ((mu1 - mu2) ** 2).sum() + (a + b - 2 * np.sqrt(a * b)).sum()
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_commuting_covariances_closed_form():
    rng = np.random.default_rng(1)
    q = _orthogonal(rng, 8)
    a, b = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    expected = ((mu1 - mu2) ** 2).sum() + (a + b - 2 * np.sqrt(a * b)).sum()
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_zero_for_identical_and_symmetric():
    rng = np.random.default_rng(2)
    mu1, mu2, s1, s2 = rng.normal(size=10), rng.normal(size=10), _random_cov(rng, 10), _random_cov(rng, 10)
    assert abs(M.frechet_distance(mu1, s1, mu1, s1)) < 1e-8 * np.trace(s1)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(M.frechet_distance(mu2, s2, mu1, s1), rel=1e-9)


@pytest.mark.parametrize("n1, n2", [(60, 60), (8, 12), (4, 4)])  # full rank, then singular covariances (n <= d)
def test_frechet_distance_matches_eigendecomposition(n1, n2):
    rng = np.random.default_rng(n1 + n2)
    s1, s2 = _random_cov(rng, 20, n1), _random_cov(rng, 20, n2)
    mu1, mu2 = rng.normal(size=20), rng.normal(size=20)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_frechet_by_eigh(mu1, s1, mu2, s2), rel=1e-6)


def test_frechet_distance_rejects_bad_inputs():
    eye = np.eye(3)
    with pytest.raises(ValueError, match="different dimensions"):
        M.frechet_distance(np.zeros(3), eye, np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match=r"shape \(D,\)"):
        M.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), eye)
    with pytest.raises(ValueError, match="NaN or inf"):
        M.frechet_distance(np.array([0, np.nan, 0]), eye, np.zeros(3), eye)
    with pytest.raises(ValueError, match="not positive semi-definite"):
        M.frechet_distance(np.zeros(3), np.diag([-1.0, 1, 1]), np.zeros(3), eye)


def test_feature_statistics():
    f = torch.randn(50, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mu, sigma = M.feature_statistics(f.float())
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (4, 4)
    np.testing.assert_allclose(mu, f.mean(0).numpy(), atol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(f.numpy(), rowvar=False), atol=1e-6)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        M.feature_statistics(f[0])
    with pytest.raises(ValueError, match="at least 2"):
        M.feature_statistics(f[:1])


# --- the digit classifier ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    data = load_dataset(DataConfig(source="mnist"))
    return data.images.float() / 127.5 - 1, data.labels  # sorted by label: split by index mod 5, not by position


@pytest.fixture(scope="module")
def heldout_classifier(digits, tmp_path_factory):
    """The recipe (train.DIGIT_RECIPE) trained by the one Trainer on 4,000 digits; the other 1,000 (100 per class) are
    held out."""
    from diffuse.config import RunConfig, apply_overrides
    from diffuse.data import Subset
    from diffuse.train import DIGIT_RECIPE, Trainer

    x, y = digits
    test = torch.arange(len(y)) % 5 == 4
    data = load_dataset(DataConfig(source="mnist"))
    steps = (int((~test).sum()) // 64) * 6  # the recipe's 6 epochs of batch 64 on the 4,000
    cfg = apply_overrides(RunConfig(), DIGIT_RECIPE + [f"train.steps={steps}", f"train.checkpoint_every={steps}"])
    trainer = Trainer(cfg, tmp_path_factory.mktemp("digits") / "run", progress=False,
                      dataset=Subset(data, torch.nonzero(~test).flatten()))
    trainer.fit()
    return trainer.model.eval().requires_grad_(False), x[test], y[test]


def test_digit_classifier_heldout_accuracy(heldout_classifier):
    net, x_test, y_test = heldout_classifier
    assert D.classifier_accuracy(net, x_test, y_test) > 0.95
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_digit_classifier_shapes_and_resize():
    net = D.DigitClassifier().eval()
    for side in (28, 32, 8):
        x = torch.rand(3, 1, side, side) * 2 - 1
        assert net.features(x).shape == (3, 128) and net(x).shape == (3, 10)
    with pytest.raises(ValueError, match="grayscale"):
        net(torch.zeros(2, 3, 28, 28))


def test_digit_classifier_cache(tmp_path, monkeypatch):
    import diffuse.train as T

    steps = ["train.steps=20", "train.checkpoint_every=20"]  # the caching, not the accuracy, is tested here
    monkeypatch.setattr(T, "DIGIT_RECIPE", T.DIGIT_RECIPE + steps)
    monkeypatch.setenv("DIFFUSE_CACHE", str(tmp_path))
    first = T.digit_classifier()
    (cached,) = tmp_path.iterdir()  # one run folder, no temporary folders left behind
    assert cached.name.startswith(f"digit_classifier-v{T.DIGIT_SPACE_VERSION}-") and (cached / "config.toml").is_file()

    class NoTraining:
        def __init__(self, *args, **kwargs):
            raise AssertionError("the cached classifier must be loaded, not retrained")

    with monkeypatch.context() as m:
        m.setattr(T, "Trainer", NoTraining)
        second = T.digit_classifier()
    assert not second.training and not any(p.requires_grad for p in second.parameters())
    for (k, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), k

    for f in (cached / "checkpoints").rglob("model.safetensors"):
        f.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable digit-classifier cache"):
        third = T.digit_classifier(tmp_path)
    assert torch.equal(third.head.weight, first.head.weight)  # deterministic retraining, cache rewritten
    assert T.digit_classifier(tmp_path) is not None and len(list(tmp_path.iterdir())) == 1


def test_cache_name_changes_with_recipe(tmp_path, monkeypatch):
    import diffuse.train as T

    before = T.digit_classifier_folder(tmp_path)
    monkeypatch.setattr(T, "DIGIT_RECIPE", T.DIGIT_RECIPE + ["train.lr=1e-3"])
    assert T.digit_classifier_folder(tmp_path) != before


# --- FID in the classifier's feature space ----------------------------------------------------
def _shift(x, k):
    """Move the digits k pixels right and down, filling with background."""
    return F.pad(x, (k, 0, k, 0), value=-1)[..., :x.shape[-2], :x.shape[-1]]


def _blur(x, s):
    r = torch.arange(-2, 3.0)
    k = torch.exp(-r**2 / (2 * s**2))
    k = k / k.sum()
    return F.conv2d(F.pad(x, (2, 2, 2, 2), value=-1), (k[:, None] * k[None])[None, None])


def test_fid_orders_degradations(digits, heldout_classifier):
    net = heldout_classifier[0]
    x, _ = digits
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    a, b = x[perm[:2500]], x[perm[2500:]]
    halves = M.fid(a, b, net)
    shifted, blurred = M.fid(a, _shift(b, 2), net), M.fid(a, _blur(b, 1.0), net)
    noise = M.fid(a, torch.rand(b.shape, generator=g) * 2 - 1, net)
    assert 0 <= halves < 0.1 * min(shifted, blurred)
    assert max(shifted, blurred) < noise


def test_fid_checks_inputs(digits):
    net = D.DigitClassifier().eval()
    x = digits[0][:40]
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        M.fid(x, (x + 1) * 127.5, net)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        M.fid(x, x[:, 0], net)
    with pytest.raises(ValueError, match="at least 2"):
        M.fid(x, x[:1], net)
    with pytest.warns(UserWarning, match="more than 128"):
        M.fid(x, x.flip(0), net)


@pytest.mark.parametrize("metric", ["fid", "kid", "precision_recall"])
def test_two_set_metrics_refuse_sets_of_different_sizes(digits, metric):
    # the feature network would resample one set, and resampling alone moves digits far (bench/latent.py's note):
    # 28x28 reals against 32x32 samples is a mistake, named with its fix
    net = D.DigitClassifier().eval()
    x = digits[0][:40]
    wider = F.interpolate(x, size=32, mode="bilinear", antialias=True)
    with pytest.raises(ValueError, match=r"\(1, 28, 28\).*\(1, 32, 32\).*the run's data config"):
        getattr(M, metric)(x, wider, net)
    with pytest.raises(ValueError, match="different sizes"):
        getattr(M, metric)(x, x.expand(-1, 3, -1, -1), net)
