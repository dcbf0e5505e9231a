"""The FID Inception-v3: its file layout, loading weights safely from a local file, and its errors."""

import json
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch

from diffuse import metrics
from diffuse.nets.inception import WEIGHTS_URL, FIDInceptionV3, _avg_pool_3x3, inception_fid

LAYOUT = json.loads((Path(__file__).parent / "data" / "fid_inception_state_dict.json").read_text())


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return FIDInceptionV3().eval()


@pytest.fixture(scope="module")
def weights_file(net, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(net.state_dict(), path)
    return path


def test_state_dict_has_the_layout_of_the_pytorch_fid_file(net):
    """Names, order and shapes equal torchvision's Inception3 with 1008 classes and no aux head (the fixture's
    source): the layout in which pt_inception-2015-12-05-6726825d.pth is stored."""
    ours = [[k, list(v.shape)] for k, v in net.state_dict().items()]
    assert ours == LAYOUT["shapes"]
    assert sum(v.numel() for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")) == 23_885_392


def test_tensorflow_average_pool_ignores_the_padding():
    x = torch.ones(1, 2, 5, 5)
    assert torch.equal(_avg_pool_3x3(x), x)  # zero padding counted would give 4/9 at the corners
    y = torch.arange(9.0).view(1, 1, 3, 3)
    assert _avg_pool_3x3(y)[0, 0, 0, 0] == (0 + 1 + 3 + 4) / 4


def test_features_and_logits_shapes_for_grey_and_small_images(net):
    g = torch.Generator().manual_seed(0)
    grey = torch.rand(2, 1, 28, 28, generator=g) * 2 - 1
    with torch.no_grad():
        f, logits = net.features(grey), net(grey)
        rgb = net.features(grey.expand(-1, 3, -1, -1))
    assert f.shape == (2, 2048) and logits.shape == (2, 1008)
    torch.testing.assert_close(logits, f @ net.fc.weight.T)  # IS logits leave out the bias, as the reference code
    torch.testing.assert_close(f, rgb, rtol=0, atol=0)  # grey is repeated to RGB
    assert (f >= 0).all()  # pool3 averages ReLU outputs
    with pytest.raises(ValueError, match=r"1 or 3"):
        net.features(torch.zeros(1, 2, 28, 28))


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "nested", "old_batchnorm"])
def test_loads_a_weights_file(net, tmp_path, fmt):
    state = net.state_dict()
    path = tmp_path / f"w.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    elif fmt == "nested":
        torch.save({"state_dict": state, "epoch": 3}, path)
    elif fmt == "old_batchnorm":  # written before torch 0.4.1: no num_batches_tracked
        torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    else:
        torch.save(state, path)
    with pytest.warns(UserWarning, match="not the standard FID Inception file"):
        loaded = inception_fid(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    x = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.features(x), net.features(x))


def test_environment_variable_names_the_file(weights_file, monkeypatch):
    monkeypatch.setenv("DIFFUSE_INCEPTION_WEIGHTS", str(weights_file))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert isinstance(metrics.feature_network("inception"), FIDInceptionV3)
        assert isinstance(metrics.feature_network(f"inception:{weights_file}"), FIDInceptionV3)


def test_missing_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFUSE_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(FileNotFoundError, match="DIFFUSE_INCEPTION_WEIGHTS is not set") as e:
        inception_fid()
    assert WEIGHTS_URL in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist.*curl -LO"):
        inception_fid(tmp_path / "nope.pth")


def test_damaged_or_foreign_files_are_refused(weights_file, tmp_path):
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(weights_file.read_bytes()[:100_000])
    with pytest.raises(ValueError, match="damaged or incomplete"):
        inception_fid(truncated)
    foreign = tmp_path / "digits.pth"
    torch.save(metrics.DigitClassifier().state_dict(), foreign)
    with pytest.raises(ValueError, match="is not the FID Inception-v3.*missing keys"):
        inception_fid(foreign)
    reshaped = tmp_path / "reshaped.pth"
    state = FIDInceptionV3(num_classes=1000).state_dict()
    torch.save(state, reshaped)
    with pytest.raises(ValueError, match="shapes"):
        inception_fid(reshaped)


class _Payload:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_a_pickle_that_would_run_code_is_not_executed(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"x": _Payload()}, path)
    with pytest.raises(ValueError, match="cannot read Inception weights"):
        inception_fid(path)
    assert "code ran" not in capsys.readouterr().out
