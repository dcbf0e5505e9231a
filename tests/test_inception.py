"""The FID Inception-v3: its file layout, loading weights safely from a local file, and its errors."""

import json
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch

import diffuse.train as train_mod
from diffuse.nets.digits import DigitClassifier
import torch.nn.functional as F

from diffuse.nets import inception as I
from diffuse.nets.inception import WEIGHTS_URL, FIDInceptionV3, _avg_pool_3x3, inception_fid

LAYOUT = json.loads((Path(__file__).parent / "data" / "fid_inception_state_dict.json").read_text())


def _randomise_batch_norms(module, seed=0):
    """Random batch-norm statistics and affine terms, so that no layer is close to the identity."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.normal_(0, 0.1, generator=g)
    return module.eval()


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return _randomise_batch_norms(FIDInceptionV3())


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


def _seq(x, *layers):
    for layer in layers:
        x = layer(x)
    return x


def _max3(x):
    return F.max_pool2d(x, 3, stride=2)


# Each block's output, branch by branch in channel order, as pytorch-fid's FIDInceptionA / B / C / D / E_1 / E_2
# compute them: the 3x3 average pools leave out the padding, and only Mixed_7c (E_2) max-pools its pool branch.
BRANCHES = {
    "A": lambda b, x: [b.branch1x1(x), _seq(x, b.branch5x5_1, b.branch5x5_2),
                       _seq(x, b.branch3x3dbl_1, b.branch3x3dbl_2, b.branch3x3dbl_3),
                       b.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))],
    "B": lambda b, x: [b.branch3x3(x), _seq(x, b.branch3x3dbl_1, b.branch3x3dbl_2, b.branch3x3dbl_3), _max3(x)],
    "C": lambda b, x: [b.branch1x1(x), _seq(x, b.branch7x7_1, b.branch7x7_2, b.branch7x7_3),
                       _seq(x, b.branch7x7dbl_1, b.branch7x7dbl_2, b.branch7x7dbl_3, b.branch7x7dbl_4, b.branch7x7dbl_5),
                       b.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))],
    "D": lambda b, x: [_seq(x, b.branch3x3_1, b.branch3x3_2),
                       _seq(x, b.branch7x7x3_1, b.branch7x7x3_2, b.branch7x7x3_3, b.branch7x7x3_4), _max3(x)],
    "E_1": lambda b, x: [b.branch1x1(x), b.branch3x3_2a(b.branch3x3_1(x)), b.branch3x3_2b(b.branch3x3_1(x)),
                         b.branch3x3dbl_3a(_seq(x, b.branch3x3dbl_1, b.branch3x3dbl_2)),
                         b.branch3x3dbl_3b(_seq(x, b.branch3x3dbl_1, b.branch3x3dbl_2)),
                         b.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False))],
}
BRANCHES["E_2"] = lambda b, x: BRANCHES["E_1"](b, x)[:-1] + [b.branch_pool(F.max_pool2d(x, 3, 1, 1))]


@pytest.mark.parametrize("name,kind,c_in", [("Mixed_5b", "A", 192), ("Mixed_6a", "B", 288), ("Mixed_6e", "C", 768),
                                            ("Mixed_7a", "D", 768), ("Mixed_7b", "E_1", 1280), ("Mixed_7c", "E_2", 2048)])
def test_each_block_concatenates_its_branches_as_the_fid_graph(net, name, kind, c_in):
    block = getattr(net, name)
    x = torch.randn(2, c_in, 9, 9, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(block(x), torch.cat(BRANCHES[kind](block, x), 1))


def test_stem_and_head_shapes_follow_the_paper(net):
    """299 -> 149 -> 147 -> 147 -> 73 -> 73 -> 71 -> 35 (Szegedy et al. 2016, table 1), then 35 -> 17 -> 8 -> pool3."""
    seen = {}
    hooks = [getattr(net, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, tuple(o.shape[1:])))
             for name in ("Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e", "Mixed_7c")]
    with torch.no_grad():
        net.features(torch.zeros(1, 3, 28, 28))
    for hook in hooks:
        hook.remove()
    assert seen == {"Conv2d_4a_3x3": (192, 71, 71), "Mixed_5d": (288, 35, 35), "Mixed_6e": (768, 17, 17),
                    "Mixed_7c": (2048, 8, 8)}


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


def test_the_standard_file_loads_without_a_warning(weights_file, monkeypatch):
    monkeypatch.setattr(I, "WEIGHTS_SHA256_PREFIX", I._sha256(weights_file)[:8])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inception_fid(weights_file)


def test_environment_variable_names_the_file(weights_file, monkeypatch):
    monkeypatch.setenv("DIFFUSE_INCEPTION_WEIGHTS", str(weights_file))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert isinstance(train_mod.feature_network("inception"), FIDInceptionV3)
        assert isinstance(train_mod.feature_network(f"inception:{weights_file}"), FIDInceptionV3)


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
    for name, data in [("truncated.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a"), ("text.pth", b"hello"),
                       ("lfs.pth", b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 95628359\n")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="not a complete torch or safetensors file"):
            inception_fid(tmp_path / name)
    foreign = tmp_path / "digits.pth"
    torch.save(DigitClassifier().state_dict(), foreign)
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
