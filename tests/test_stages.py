"""Stages (stages.py): a frozen upstream run pinned by checkpoint step and the hash of its weights, and what is computed
from it cached under that key, rebuilt when the key changes or the file is damaged."""

from __future__ import annotations

import pytest
import torch

from diffuse import checkpoint as ckpt
from diffuse.stages import Stage, cached


def test_cached_tensors_follow_their_key(tmp_path):
    path, calls = tmp_path / "cache.safetensors", []

    def compute(value):
        def f():
            calls.append(value)
            return {"z": torch.full((2, 3), float(value))}
        return f

    assert torch.equal(cached(path, {"a": 1}, compute(1))["z"], torch.ones(2, 3))
    assert torch.equal(cached(path, {"a": 1}, compute(9))["z"], torch.ones(2, 3)) and calls == [1]  # read back
    assert torch.equal(cached(path, {"a": 2}, compute(2))["z"], torch.full((2, 3), 2.0)) and calls == [1, 2]  # new key
    path.write_bytes(path.read_bytes()[:40])  # damaged: rebuilt with a warning, never trusted
    with pytest.warns(UserWarning, match="could not be read"):
        assert torch.equal(cached(path, {"a": 2}, compute(3))["z"], torch.full((2, 3), 3.0))


def test_a_stage_is_pinned_by_its_weights(tmp_path):
    run = tmp_path / "ae"
    ckpt.save_checkpoint(run, 5, {"model": {"w": torch.zeros(3)}}, {"step": 5})
    first = Stage("autoencoder", run, 5).key(n=10)
    assert first["autoencoder"] == str(run) and first["step"] == 5 and first["n"] == 10 and len(first["weights"]) == 64
    ckpt.save_checkpoint(run, 5, {"model": {"w": torch.ones(3)}}, {"step": 5})  # the same step, other weights
    assert Stage("autoencoder", run, 5).key(n=10)["weights"] != first["weights"]
    with pytest.raises(FileNotFoundError, match="no longer holds checkpoint 7"):
        Stage("autoencoder", run, 7).key()


def test_a_cache_that_cannot_be_written_costs_only_the_cache(tmp_path, monkeypatch):
    """A read-only upstream run folder (or a full disk): the tensors come back with a warning naming the file, nothing
    is written, and the next call computes them again."""
    import errno

    def refuse(path, data):
        raise ckpt.WriteError(errno.EROFS, f"could not write {path}: read-only file system", path)

    monkeypatch.setattr(ckpt, "write_atomically", refuse)
    path, calls = tmp_path / "cache.safetensors", []

    def compute():
        calls.append(1)
        return {"z": torch.arange(6.0).view(2, 3)}

    with pytest.warns(UserWarning, match=r"cache.safetensors: read-only .*used uncached"):
        assert torch.equal(cached(path, {"a": 1}, compute)["z"], torch.arange(6.0).view(2, 3))
    with pytest.warns(UserWarning):
        cached(path, {"a": 1}, compute)
    assert calls == [1, 1] and not path.exists()
