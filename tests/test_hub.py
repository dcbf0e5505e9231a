"""Hugging Face model ids as RUN (runs.locate): `diffuse sample|edit|eval|serve owner/name [--revision R]` read the
model from huggingface_hub's cache, offline with HF_HUB_OFFLINE=1, and download it into the cache where the network
allows. The cache is laid out by huggingface_hub itself: its `snapshot_download` fills it from a stand-in Hub on
127.0.0.1 (the few endpoints it calls: revision info, the file tree, each file's HEAD and GET), holding two exports of
one run at two commits (main: the EMA weights; tag v1: the raw ones)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")
pytest.importorskip("diffusers")

from diffuse.app.cli import main  # noqa: E402
from diffuse.config import RunConfig, apply_overrides  # noqa: E402
from diffuse.runs import locate  # noqa: E402
from diffuse.train import train  # noqa: E402

REPO, MAIN, V1 = "owner/name", "a" * 40, "b" * 40
TINY = ["data.source=digits", "data.image_size=8", "data.channels=1", "schedule.T=100", "schedule.beta_end=0.1",
        "model.channels=8", "model.channel_mult=[1, 2]", "model.num_res_blocks=1", "model.norm_groups=4",
        "model.attention_resolutions=[4]", "model.dropout=0.0", "model.prediction=v", "sample.steps=4",
        "train.batch_size=8", "train.steps=3", "train.lr=2e-3", "train.warmup_steps=1", "train.ema_decay=0.5",
        "train.log_every=1000", "train.sample_every=0", "train.checkpoint_every=1000", "train.mixed_precision=no"]


class StandIn(BaseHTTPRequestHandler):
    """The Hub's answers that snapshot_download reads, for `commits` (commit -> {path: bytes}) and `refs` (repo ->
    {branch, tag or commit: commit}); an unknown repo or revision is a 404 with the Hub's X-Error-Code."""

    refs: dict[str, dict[str, str]] = {}
    commits: dict[str, dict[str, bytes]] = {}

    def log_message(self, *args):
        pass

    def answer(self, head: bool) -> None:
        parts = self.path.split("?")[0].strip("/").split("/")
        api = parts[:2] == ["api", "models"]
        repo, rev = ("/".join(parts[2:4]), parts[5]) if api else ("/".join(parts[:2]), parts[3])
        commit = self.refs.get(repo, {}).get(rev)
        if commit is None:
            return self.send(404, b"{}", {"X-Error-Code": "RevisionNotFound" if repo in self.refs else "RepoNotFound"}, head)
        files = self.commits[commit]
        if api and parts[4] == "revision":
            return self.send(200, json.dumps({"id": repo, "sha": commit, "siblings": [{"rfilename": p} for p in files]}).encode(),
                             {"Content-Type": "application/json"}, head)
        if api:  # the tree
            return self.send(200, json.dumps([{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                                              for p, b in files.items()]).encode(), {"Content-Type": "application/json"}, head)
        data = files.get("/".join(parts[4:]))
        if data is None:
            return self.send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
        self.send(200, data, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}, head)

    def send(self, code: int, body: bytes, headers: dict, head: bool) -> None:
        self.send_response(code)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def do_GET(self):
        self.answer(False)

    def do_HEAD(self):
        self.answer(True)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(endpoint URL, cache filled by huggingface_hub, {revision: its export folder})."""
    root = tmp_path_factory.mktemp("hub")
    train(apply_overrides(RunConfig(), TINY), root / "run")
    folders = {MAIN: root / "ema", V1: root / "raw"}
    assert main(["export", str(root / "run"), "--format", "diffusers", "--out", str(folders[MAIN])]) == 0
    assert main(["export", str(root / "run"), "--format", "diffusers", "--out", str(folders[V1]), "--no-ema"]) == 0
    StandIn.commits = {c: files_of(f) for c, f in folders.items()}
    StandIn.refs = {REPO: {"main": MAIN, "v1": V1, MAIN: MAIN, V1: V1}}
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    cache = root / "cache"
    for revision in ("main", "v1"):  # huggingface_hub lays out its own cache: blobs/, refs/, snapshots/<commit>/
        huggingface_hub.snapshot_download(REPO, revision=revision, endpoint=url, cache_dir=cache)
    yield url, cache, folders
    server.shutdown()


@pytest.fixture
def offline(hub, monkeypatch):
    """HF_HUB_OFFLINE=1 with HF_HUB_CACHE the filled cache, for calls in this process."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub[1]))
    return hub


def sample(run, tmp_path, *args) -> np.ndarray:
    out = tmp_path / "x.npy"
    assert main(["sample", str(run), "--n", "2", "--seed", "1", "--mixed-precision", "no", "--out", str(out), *args]) == 0
    return np.load(out)


def test_the_cache_is_huggingface_hubs_own(hub):
    info = huggingface_hub.scan_cache_dir(hub[1])
    (repo,) = info.repos
    assert (repo.repo_id, {r.commit_hash: set(r.refs) for r in repo.revisions}) == (REPO, {MAIN: {"main"}, V1: {"v1"}})
    assert not info.warnings


def test_an_id_samples_from_the_cache_offline_at_each_revision(offline, tmp_path):
    _, cache, folders = offline
    assert locate(REPO) == str(cache / "models--owner--name" / "snapshots" / MAIN)
    main_ = sample(REPO, tmp_path)
    assert np.array_equal(main_, sample(folders[MAIN], tmp_path))
    for revision in ("v1", V1):  # a tag, a commit
        raw = sample(REPO, tmp_path, "--revision", revision)
        assert np.array_equal(raw, sample(folders[V1], tmp_path)), revision
    assert np.abs(raw - main_).max() > 1e-3  # the two revisions are two models


def test_an_id_not_in_the_cache_offline_names_the_download(offline, tmp_path, capsys):
    assert main(["sample", "owner/missing", "--n", "1", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert ("owner/missing is no folder here, and the Hugging Face model owner/missing is not in the cache" in err
            and "HF_HUB_OFFLINE=1 reads the cache alone" in err and "`hf download owner/missing`" in err), err
    assert main(["sample", REPO, "--revision", "v9", "--n", "1", "--out", str(tmp_path / "x.png")]) == 2
    assert f"the Hugging Face model {REPO} at revision 'v9' is not in the cache" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_an_incomplete_snapshot_is_named(offline, tmp_path, monkeypatch):
    """A cached snapshot that misses a file of its tree (an interrupted download) is named as such, offline."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(offline[1], cache, symlinks=True)
    (cache / "models--owner--name" / "snapshots" / V1 / "unet" / "config.json").unlink()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(FileNotFoundError, match=r"owner/name at revision 'v1': .*is incomplete: 1 file\(s\) are missing \(unet/config.json\)"):
        locate(REPO, "v1")


def test_revision_needs_a_model_id(hub, tmp_path, capsys):
    assert main(["sample", str(hub[2][MAIN]), "--revision", "v1", "--n", "1", "--out", str(tmp_path / "x.png")]) == 2
    assert "--revision v1 picks a version of a Hugging Face model id" in capsys.readouterr().err


def test_edit_eval_and_serve_take_an_id(offline, tmp_path, capsys, monkeypatch):
    """edit: the same output as on the export's folder; serve: the snapshot folders are served; eval: an id is
    resolved before anything else (a missing one is the cache's error)."""
    from PIL import Image

    import diffuse.app.commands as commands

    _, cache, folders = offline
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "in.png")
    outs = []
    for run in (REPO, str(folders[V1])):
        out = tmp_path / f"{len(outs)}.npy"
        assert main(["edit", "sdedit", run, *(["--revision", "v1"] if run == REPO else []), "--image", str(tmp_path / "in.png"),
                     "--strength", "0.5", "--n", "2", "--steps", "4", "--out", str(out)]) == 0
        outs.append(np.load(out))
    assert np.array_equal(*outs)
    served = []
    monkeypatch.setattr(commands, "serve", lambda runs, **kw: served.extend(runs))
    assert main(["serve", REPO, str(folders[MAIN]), "--revision", "v1"]) == 2  # one revision for ids: a folder refuses it
    assert main(["serve", REPO, "--revision", "v1"]) == 0
    assert served == [str(cache / "models--owner--name" / "snapshots" / V1)]
    capsys.readouterr()
    assert main(["eval", "owner/missing", "--metric", "fid", "--n", "2"]) == 2
    assert "not in the cache" in capsys.readouterr().err


def cli(*args, env: dict) -> subprocess.CompletedProcess:
    """`python -m diffuse ARGS` in a fresh process with the environment `env` added (the variables huggingface_hub
    reads when it is imported)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "diffuse", *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a fresh process imports torch and diffusers: ~25 s on a shared 2-core CPU
def test_the_environment_variables_offline(hub, tmp_path):
    """HF_HUB_OFFLINE=1 with HF_HUB_CACHE, as a user sets them before the command starts."""
    _, cache, folders = hub
    done = cli("sample", REPO, "--revision", "v1", "--n", "2", "--seed", "1", "--mixed-precision", "no", "--out",
               str(tmp_path / "a.npy"), env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)})
    assert done.returncode == 0, done.stderr
    assert np.array_equal(np.load(tmp_path / "a.npy"), sample(folders[V1], tmp_path))


def test_a_download_where_the_network_allows(hub, tmp_path, monkeypatch, capsys):
    """Online (the Hub's address: the stand-in), an empty cache is filled by the download; an unknown revision or model
    is named."""
    url, _, folders = hub
    fresh = tmp_path / "fresh"
    for name, value in (("HF_HUB_OFFLINE", False), ("HF_HUB_CACHE", str(fresh)), ("ENDPOINT", url),
                        ("HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")):
        monkeypatch.setattr(huggingface_hub.constants, name, value)
    assert np.array_equal(sample(REPO, tmp_path, "--revision", "v1"), sample(folders[V1], tmp_path))
    assert (fresh / "models--owner--name" / "snapshots" / V1 / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert main(["sample", REPO, "--revision", "v9", "--out", str(tmp_path / "c.png")]) == 2
    assert "--revision v9: the Hugging Face model owner/name has no such branch, tag or commit" in capsys.readouterr().err
    assert main(["sample", "owner/other", "--out", str(tmp_path / "c.png")]) == 2
    assert "owner/other is no folder here, nor a model on the Hugging Face Hub" in capsys.readouterr().err
