"""Safe, atomic checkpoints in a run folder: safetensors for tensors, JSON for the rest.

Layout::

    RUN/checkpoints/step_00000100/  model.safetensors  ema.safetensors  ...  state.json  manifest.json

Nothing here unpickles. `torch.load` of a `.pt` file runs arbitrary code from whoever wrote it,
so tensors live in safetensors files and everything else (step, config, the structure of an
optimizer's state dict, RNG states) in plain JSON; `flatten_state` / `unflatten_state` split a
nested state dict into the two and join it back exactly.

Why a commit protocol: a training job is killed at arbitrary moments (preemption, OOM killer,
Ctrl-C), and `safetensors.torch.save_file` simply opens the target and writes, so a kill mid-write
leaves a truncated file under the real name -- and with several files per checkpoint, even whole
files can come from two different saves. So `save_checkpoint`:

1. builds the checkpoint in `checkpoints/.tmp-step_NNNNNNNN-<pid>` (same folder, so the final
   rename never crosses a filesystem);
2. writes each file to a temporary name, flushes, `os.fsync`s and `os.replace`s it into place;
3. writes `manifest.json` LAST: the step plus the size and sha256 of every file. It is the
   commit mark: a folder whose manifest does not match its files was never committed or was
   damaged later, and the loader skips it;
4. fsyncs the temporary folder, then renames it to `step_NNNNNNNN` (an existing folder of that
   step is first moved aside to `.old-step_NNNNNNNN-<pid>` and deleted only after the new one is
   in place; until then the loader still finds it there) and fsyncs `checkpoints/`, so the
   rename itself survives a power cut;
5. only then prunes: keeps the newest `keep` valid checkpoints (the new one always counts),
   removes every other one, invalid ones included, and the `.tmp-*` leftovers of crashed saves.
   Folders are renamed to `.tmp-del-*` before deletion, so a crash mid-delete never leaves a
   half-deleted `step_*` folder behind.

At every instant the newest valid checkpoint is therefore a complete save. One writer per run
folder is assumed (the trainer); readers may run at any time.
"""

from __future__ import annotations

import errno
import hashlib
import json
import operator
import os
import random
import re
import shutil
import stat
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor

__all__ = [
    "Checkpoint",
    "CheckpointWarning",
    "save_checkpoint",
    "load_checkpoint",
    "latest_step",
    "flatten_state",
    "unflatten_state",
    "capture_rng",
    "restore_rng",
    "generator_state",
    "set_generator_state",
    "write_atomically",
    "WriteError",
    "read_json_records",
    "append_json_record",
    "read_log",
    "open_log",
    "load_weights",
]

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
STATE = "state.json"
FORMAT = "diffuse-checkpoint"
VERSION = 1

_GROUP_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
_FILE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*\.safetensors|state\.json")
_STEP_RE = re.compile(r"step_(\d{8,})")
_OLD_RE = re.compile(r"\.old-step_(\d{8,})-\d+")


class CheckpointWarning(UserWarning):
    """An invalid checkpoint was skipped while looking for the newest valid one."""


class _Invalid(Exception):
    """Internal: a checkpoint folder fails verification; the message is the reason."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: `tensors[group][name]` from `{group}.safetensors`, `state` from state.json."""

    step: int
    path: Path
    tensors: dict[str, dict[str, Tensor]]
    state: dict


# ---------------------------------------------------------------------------------------------
# saving


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    tensors: Mapping[str, Mapping[str, Tensor]],
    state: Mapping[str, Any],
    keep: int | None = 2,
) -> Path:
    """Atomically write checkpoint `step` under `run_dir/checkpoints/`, then prune; returns its folder.

    `tensors` maps a group name to a flat dict of tensors (one `{group}.safetensors` each);
    `state` must be JSON as is (use `flatten_state` for optimizer states and the like).
    `keep` is how many valid checkpoints survive pruning (the new one always does); None
    keeps all. Everything is validated and serialised before anything touches the disk, so a
    bad argument leaves the run folder as it was.
    """
    step = _check_step(step)
    if keep is not None and (isinstance(keep, bool) or operator.index(keep) < 1):
        raise ValueError(f"keep must be >= 1 (or None to keep every checkpoint), got {keep!r}")
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a dict of group name -> dict of tensors, got {type(tensors).__name__}")
    _check_json(state, "state")
    payload = {f"{group}.safetensors": _serialise_group(group, ts) for group, ts in tensors.items()}
    payload[STATE] = json.dumps(state, indent=1).encode()
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "files": {
            name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in sorted(payload.items())
        },
    }

    ckpt_dir = Path(run_dir) / CHECKPOINTS
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = _dirname(step)
    tmp = ckpt_dir / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():  # left by an earlier crashed process that had our pid
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        for fname, data in payload.items():
            write_atomically(tmp / fname, data)
        write_atomically(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())  # the commit mark, last
    except OSError as e:  # a full disk: nothing of this save stays, the committed checkpoints are untouched
        shutil.rmtree(tmp, ignore_errors=True)
        last = max((s for s, p in _candidates(ckpt_dir).items() if _is_valid(p, s)), default=None)
        kept = ("no checkpoint was committed before" if last is None else
                f"the checkpoints committed before are kept (the newest: step {last})")
        raise WriteError.of(e, ckpt_dir / name, sum(map(len, payload.values())), kept=kept) from e
    fsync_dir(tmp)

    final = ckpt_dir / name
    aside = None
    if final.exists():  # a re-save: keep the old copy until the new one is in place
        aside = ckpt_dir / f".old-{name}-{os.getpid()}"
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_dir(ckpt_dir)
    if aside is not None:
        _remove(aside)
    _prune(ckpt_dir, keep, committed=step)
    return final


def _serialise_group(group: Any, tensors: Any) -> bytes:
    """One group as safetensors bytes: CPU, contiguous, no two tensors sharing storage."""
    if not isinstance(group, str) or not _GROUP_RE.fullmatch(group):
        raise ValueError(
            f"tensor group name {group!r} is not a valid file stem (it becomes '{group}.safetensors'): "
            "use letters, digits, '_' and '-', not starting with '-'"
        )
    if not isinstance(tensors, Mapping):
        raise TypeError(
            f"tensors[{group!r}] must be a flat dict of name -> Tensor, got {type(tensors).__name__}; "
            "split nested structures with flatten_state"
        )
    prepared: dict[str, Tensor] = {}
    storages: set[int] = set()
    for key, t in tensors.items():
        if not isinstance(key, str):
            raise TypeError(f"tensors[{group!r}] has key {key!r}: tensor names must be str")
        if not isinstance(t, Tensor):
            raise TypeError(
                f"tensors[{group!r}][{key!r}] is a {type(t).__name__}, not a Tensor: put plain values "
                "in `state`, and split nested structures with flatten_state"
            )
        t = t.detach().to("cpu").contiguous()  # safetensors refuses non-contiguous tensors
        ptr = t.untyped_storage().data_ptr()
        if t.untyped_storage().nbytes():
            if ptr in storages:  # safetensors refuses tensors that share memory; a copy is cheap
                t = t.clone()
            storages.add(ptr)
        prepared[key] = t
    return safetensors.torch.save(prepared)


def _check_json(obj: Any, path: str) -> None:
    """Raise TypeError naming the key path of the first value JSON would not give back as is."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_json(v, f"{path}[{i}]")
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(
                    f"{path} has the {type(k).__name__} key {k!r}; JSON keys are strings, so it would load "
                    "back changed: use str keys, or store the structure through flatten_state (keeps int keys)"
                )
            _check_json(v, f"{path}[{k!r}]")
    elif isinstance(obj, tuple):
        raise TypeError(
            f"{path} is a tuple, which JSON would load back as a list: pass a list, or store the "
            "structure through flatten_state (keeps tuples)"
        )
    elif isinstance(obj, Tensor):
        raise TypeError(
            f"{path} is a Tensor: tensors belong in `tensors`; flatten_state splits a nested "
            "structure into a tensor dict and a JSON skeleton"
        )
    else:
        raise TypeError(
            f"{path} is a {type(obj).__module__}.{type(obj).__qualname__}, which JSON cannot store: "
            "convert it to int/float/str/bool/None/list/dict (e.g. int(x), x.tolist())"
        )


def write_atomically(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` (bytes, or text as UTF-8) to `path` so that readers see the old file or the whole new one, never a
    part: a uniquely named temporary file `.NAME.*.tmp` in the same folder (safe for parallel writers), fsync,
    os.replace; the temporary file is removed if anything fails. The one atomic-write path of the package: checkpoints,
    configs, eval records, sample and edit outputs, figures, GIFs, the web page's files, the cached digit classifier.

    A failed write (a full disk, a read-only folder) leaves any earlier file at `path` as it was and raises WriteError,
    an OSError whose message names the file, gives the reason in words ("no space left on device") and says what was
    kept."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            if os.name == "posix":  # mkstemp makes 0600 files; keep an earlier file's mode, else what open() would give
                os.fchmod(fd, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, WriteError):
            raise
        raise WriteError.of(e, path, len(data)) from e
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask (read from /proc on Linux, where setting it to read it back would race other threads)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


_REASONS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
            errno.EPERM: "operation not permitted", errno.EFBIG: "the file is too large for the file system",
            errno.EIO: "an input/output error of the device"}


def reason(e: OSError) -> str:
    """An OSError's cause in words, without the errno number: "no space left on device" for ENOSPC."""
    return _REASONS.get(e.errno) or (e.strerror or str(e)).lower() or type(e).__name__


class WriteError(OSError):
    """A file could not be written. Its message (str) names the file, gives the reason in words and says what was kept;
    `errno` is the original one (errno.ENOSPC on a full disk), `filename` the file."""

    def __init__(self, err: int | None, message: str, filename: str | os.PathLike):
        super().__init__(err, message)
        self.message, self.filename = message, str(filename)

    def __str__(self) -> str:
        return self.message

    @classmethod
    def of(cls, e: OSError, path: Path, size: int | None = None, kept: str | None = None) -> "WriteError":
        """The WriteError of `e`, raised while writing `path` (`size` bytes); `kept` says what was kept (default: the
        earlier file at `path`, or that there was none)."""
        what = f"{path}" + (f" ({size:,} bytes)" if size is not None else "")
        why = reason(e)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            try:
                free = shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free
                why += f" ({free:,} bytes free there)"
            except (OSError, StopIteration):
                pass
        if kept is None:
            kept = (f"the earlier {path.name} is kept as it was" if path.exists() else
                    f"nothing was written in its place (there was no {path.name} before)")
        fix = {errno.ENOSPC: "free some space (or choose another folder) and run the command again",
               errno.EDQUOT: "free some space within your quota and run the command again"}.get(
            e.errno, "fix the folder's permissions or choose another one, then run the command again")
        return cls(e.errno, f"could not write {what}: {why}; {kept}. {fix[0].upper()}{fix[1:]}", path)


def read_json_records(path: str | os.PathLike) -> list:
    """The records (a JSON list) of a file such as RUN/eval.json; [] when it does not exist. Raises ValueError naming the
    file and the fix when it is empty, does not parse or holds no list (then nothing can be appended to it safely)."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        text, problem = None, f"is not text ({e})"
    else:
        problem = "is empty" if not text.strip() else None
    value = None
    if problem is None:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            problem = f"is not valid JSON ({e}; {len(text):,} bytes)"
        else:
            if not isinstance(value, list):
                problem = f"holds a JSON {type(value).__name__}, not a list of records"
    if problem is not None:
        raise ValueError(f"{path} {problem}, so its records cannot be read or added to (a write of it was cut off, or "
                         f"another program wrote it); move it aside (e.g. mv {path} {path}.broken) and run the command "
                         "again, which starts a new one")
    return value


def append_json_record(path: str | os.PathLike, record: Any) -> None:
    """Append `record` to the JSON list in `path` (created if missing), rewriting the file atomically: a failure (a
    full disk, a kill) leaves every earlier record in place. ValueError as `read_json_records` for a broken file."""
    records = read_json_records(path)
    write_atomically(path, json.dumps(records + [record], indent=1))


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines log such as RUN/log.jsonl, one object per line; [] when it does not exist.

    A torn last line (a process killed or a disk filled mid-append: no newline at its end, not valid JSON) is left out
    silently, it holds no whole record; any other line that does not parse is left out with a warning naming the
    file and its line numbers."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    torn = lines.pop() if lines else b""  # the text after the last newline: b"" when the file ends with one
    out, bad = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad.append(number)
            continue
        if isinstance(record, dict):
            out.append(record)
        else:
            bad.append(number)
    if torn.strip():
        try:
            record = json.loads(torn)
            if isinstance(record, dict):
                out.append(record)  # whole, only its newline is missing
        except ValueError:
            pass
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        warnings.warn(f"{path}: left out {len(bad)} line(s) that are not JSON records (line {shown})", UserWarning,
                      stacklevel=2)
    return out


class LogFile:
    """A JSON-lines log opened for appending (`open_log`): `write(text)` appends and flushes, `close()`. A write that
    fails (a full disk) raises WriteError naming the file and saying that the lines before it are kept."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "a")

    def write(self, text: str) -> None:
        try:
            self._f.write(text)
            self._f.flush()
        except OSError as e:
            raise WriteError.of(e, self.path, kept="the lines written before are kept") from e

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as e:
            raise WriteError.of(e, self.path, kept="the lines written before are kept") from e

    def close(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass  # what could not be flushed was reported by write

    def __enter__(self) -> "LogFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_log(path: str | os.PathLike, keep=None) -> LogFile:
    """Open a JSON-lines log such as RUN/log.jsonl for appending, after cutting off a torn last line (a kill or a full
    disk mid-append left a part of a record with no newline), so the next record starts on a line of its own; every
    whole line is kept, or, with `keep(line: bytes) -> bool`, every whole line it keeps (a resumed run drops what the
    interrupted one logged past the checkpoint it resumes from, so no step is logged twice)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                data = f.seek(0) or f.read()
                f.truncate(data.rfind(b"\n") + 1)
            if keep is not None:
                lines = (f.seek(0) or f.read()).splitlines(keepends=True)
                kept = [line for line in lines if keep(line)]
                if len(kept) < len(lines):
                    f.seek(0)
                    f.write(b"".join(kept))
                    f.truncate()
    return LogFile(path)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames inside the folder `path` durable (POSIX; directories cannot be opened on Windows)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(ckpt_dir: Path, keep: int | None, committed: int) -> None:
    """Drop crashed saves' leftovers and every checkpoint but the newest `keep` valid ones."""
    found = _candidates(ckpt_dir)
    for p in list(ckpt_dir.iterdir()):
        stale_tmp = p.name.startswith(".tmp-")
        stale_old = p.name.startswith(".old-") and p not in found.values()
        if p.is_dir() and (stale_tmp or stale_old):
            _remove(p)
    if keep is None:
        return
    kept = {committed}  # just written from bytes we hashed ourselves: no need to re-read it
    for s in sorted(found, reverse=True):
        if len(kept) >= keep:
            break
        if s not in kept and _is_valid(found[s], s):
            kept.add(s)
    for s, p in found.items():
        if s not in kept:
            _remove(p)


def _remove(path: Path) -> None:
    """Delete a folder by renaming it to `.tmp-del-*` first, so it vanishes from listings atomically."""
    try:
        trash = path
        if not path.name.startswith(".tmp-"):
            trash = path.with_name(f".tmp-del-{path.name}-{os.getpid()}")
            if trash.exists():
                shutil.rmtree(trash)
            os.replace(path, trash)
        shutil.rmtree(trash)
    except OSError as e:
        warnings.warn(f"could not delete {path} ({e}); delete it by hand", CheckpointWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------
# loading


def load_checkpoint(run_dir: str | os.PathLike, step: int | None = None) -> Checkpoint:
    """Load checkpoint `step`, or with step None the newest valid one.

    Newer invalid checkpoints are skipped with one CheckpointWarning each. Raises
    FileNotFoundError when there is no checkpoint (or none of step `step`) or when all are
    invalid, and ValueError when the explicitly requested step is invalid.
    """
    ckpt_dir = Path(run_dir) / CHECKPOINTS
    found = _candidates(ckpt_dir)
    if step is not None:
        step = _check_step(step)
        if step not in found:
            raise FileNotFoundError(
                f"no checkpoint of step {step} in {ckpt_dir} (available steps: {sorted(found) or 'none'})"
            )
        try:
            return _load(found[step], step)
        except _Invalid as e:
            raise ValueError(
                f"checkpoint {found[step]} is invalid: {e}; load another step "
                "(load_checkpoint(run_dir) picks the newest valid one)"
            ) from None
    if not found:
        raise FileNotFoundError(
            f"no checkpoint in {run_dir}: {ckpt_dir} holds no step_* folder; "
            "check the run folder, or start the run from scratch"
        )
    skipped: list[tuple[Path, str]] = []
    for s in sorted(found, reverse=True):
        try:
            ckpt = _load(found[s], s)
        except _Invalid as e:
            skipped.append((found[s], str(e)))
            continue
        for path, reason in skipped:
            warnings.warn(f"skipping invalid checkpoint {path}: {reason}", CheckpointWarning, stacklevel=2)
        return ckpt
    reasons = "; ".join(f"{p.name}: {r}" for p, r in skipped)
    raise FileNotFoundError(f"all {len(skipped)} checkpoints in {ckpt_dir} are invalid: {reasons}")


def weights_mismatch(config: str | os.PathLike, weights: str | os.PathLike, module: torch.nn.Module,
                     tensors: Mapping[str, Tensor]) -> list[str]:
    """What differs between the network `config` describes (built as `module`) and the saved `tensors`, in words (one
    entry per kind of difference, the first tensor named); [] when they fit."""
    own = module.state_dict()
    missing = [k for k in own if k not in tensors]
    unexpected = [k for k in tensors if k not in own]
    shapes = [(k, list(tensors[k].shape), list(v.shape)) for k, v in own.items()
              if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)]
    return mismatch_parts(Path(config).name, shapes, missing, unexpected)


def mismatch_parts(config_name: str, shapes=(), missing=(), unexpected=()) -> list[str]:
    """The differences between a config's network and its weights, in words: shapes [(name, in the weights, in the
    network)], missing and unexpected tensor names."""
    out = []
    if shapes:
        name, have, want = shapes[0]
        out.append(f"{len(shapes)} tensors differ in shape (e.g. {name}: {have} in the weights, {want} in the network "
                   f"{config_name} describes)")
    if missing:
        out.append(f"{len(missing)} tensors the network of {config_name} has are not in the weights (e.g. {missing[0]})")
    if unexpected:
        out.append(f"{len(unexpected)} tensors of the weights have no place in it (e.g. {unexpected[0]})")
    return out


def load_weights(module: torch.nn.Module, tensors: Mapping[str, Tensor], *, config: str | os.PathLike,
                 weights: str | os.PathLike) -> torch.nn.Module:
    """module.load_state_dict(tensors), strict, or ValueError naming `config` (the file the network was built from),
    `weights` (where the tensors come from) and what differs, instead of torch's RuntimeError: a config edited after
    training (model.channels) or weights of another run."""
    parts = weights_mismatch(config, weights, module, tensors)
    if parts:
        raise ValueError(f"{config} does not match the weights {weights}: {'; '.join(parts)}; the config describes "
                         "another network than the one the weights were saved from: restore the config the weights were "
                         "trained with")
    module.load_state_dict(tensors)
    return module


def read_state(run_dir: str | os.PathLike, step: int) -> dict:
    """The JSON state of a committed checkpoint, without reading or hashing its tensors (for messages).
    FileNotFoundError naming the fix when step is None (the run folder holds no valid checkpoint: latest_step's None)."""
    if step is None:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint yet (its training stopped before the first save, every "
                                "train.checkpoint_every steps, or is still before it): resume it with `diffuse train "
                                f"{Path(run_dir) / 'config.toml'} --out {run_dir}`, or wait for its first checkpoint")
    return json.loads((Path(run_dir) / CHECKPOINTS / _dirname(step) / STATE).read_text())


def checkpoint_folders(run_dir: str | os.PathLike) -> dict[int, Path]:
    """step -> folder of every checkpoint a run folder holds (RUN/checkpoints/step_NNNNNNNN, or the `.old-*` copy that
    stands in for a step after a crash between the two renames of a re-save); not verified (see latest_step)."""
    return _candidates(Path(run_dir) / CHECKPOINTS)


def latest_step(run_dir: str | os.PathLike) -> int | None:
    """The step of the newest valid checkpoint (hashes verified), or None if there is none."""
    found = _candidates(Path(run_dir) / CHECKPOINTS)
    return next((s for s in sorted(found, reverse=True) if _is_valid(found[s], s)), None)


def _dirname(step: int) -> str:
    return f"step_{step:08d}"


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return int(step)


def _candidates(ckpt_dir: Path) -> dict[int, Path]:
    """step -> folder. A `.old-*` copy stands in for its step only while `step_*` is missing,
    i.e. after a crash between the two renames of a re-save."""
    if not ckpt_dir.is_dir():
        return {}
    found: dict[int, Path] = {}
    old: dict[int, Path] = {}
    for p in sorted(ckpt_dir.iterdir()):
        if not p.is_dir():
            continue
        if (m := _STEP_RE.fullmatch(p.name)) and p.name == _dirname(int(m[1])):
            found[int(m[1])] = p
        elif m := _OLD_RE.fullmatch(p.name):
            old.setdefault(int(m[1]), p)
    for s, p in old.items():
        found.setdefault(s, p)
    return found


def _verify(folder: Path, step: int, read: bool) -> dict[str, bytes]:
    """Check the manifest against the files; with `read`, return the files' verified bytes.

    Reading each file once and parsing those same bytes means what is loaded is what was hashed.
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_bytes())
    except FileNotFoundError:
        raise _Invalid("manifest.json is missing (the save never committed)") from None
    except (OSError, ValueError) as e:
        raise _Invalid(f"manifest.json is unreadable ({e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or STATE not in files:
        raise _Invalid("manifest.json is malformed (no 'files' entry listing state.json)")
    if type(manifest.get("step")) is not int or manifest["step"] != step:
        raise _Invalid(f"manifest.json says step {manifest.get('step')!r}, the folder name says {step}")
    present = {p.name for p in folder.iterdir() if p.name == STATE or p.name.endswith(".safetensors")}
    if unlisted := sorted(present - files.keys()):
        raise _Invalid(f"files not named in manifest.json: {', '.join(unlisted)}")
    out: dict[str, bytes] = {}
    for name, meta in files.items():
        if not isinstance(name, str) or not _FILE_RE.fullmatch(name) or not isinstance(meta, dict):
            raise _Invalid(f"manifest.json has a malformed entry {name!r}")
        path = folder / name
        try:
            size = path.stat().st_size
            if size != meta.get("size"):
                expected = meta.get("size")
                raise _Invalid(f"{name} has {size} bytes, manifest.json says {expected} (truncated or replaced)")
            if read:
                data = out[name] = path.read_bytes()
                digest = hashlib.sha256(data).hexdigest()
            else:
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                digest = h.hexdigest()
        except FileNotFoundError:
            raise _Invalid(f"{name} is missing") from None
        except OSError as e:
            raise _Invalid(f"{name} is unreadable ({e})") from None
        if digest != meta.get("sha256"):
            raise _Invalid(f"{name} does not match its sha256 in manifest.json (corrupted)")
    return out


def _is_valid(folder: Path, step: int) -> bool:
    try:
        _verify(folder, step, read=False)
        return True
    except _Invalid:
        return False


def _load(folder: Path, step: int) -> Checkpoint:
    data = _verify(folder, step, read=True)
    tensors: dict[str, dict[str, Tensor]] = {}
    for name, raw in data.items():
        try:
            if name == STATE:
                state = json.loads(raw)
            else:
                tensors[name.removesuffix(".safetensors")] = safetensors.torch.load(raw)
        except (SafetensorError, ValueError) as e:
            raise _Invalid(f"{name} does not parse ({e})") from None
    if not isinstance(state, dict):
        raise _Invalid(f"state.json holds a {type(state).__name__}, not an object")
    return Checkpoint(step=step, path=folder, tensors=tensors, state=state)


# ---------------------------------------------------------------------------------------------
# nested state <-> (flat tensors, JSON skeleton)

# A skeleton is JSON. Lists, str-keyed dicts and scalars appear as themselves (floats including
# nan/inf, which Python's json writes as NaN/Infinity); everything JSON would change is tagged
# with a one-key object: a tensor, a tuple, a dict with non-str keys or with a key that is a tag.
_TENSOR, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"
_TAGS = (_TENSOR, _TUPLE, _DICT)


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, Tensor], Any]:
    """Split a nested structure into (flat tensor dict, JSON skeleton); `unflatten_state` inverts it.

    Supports dicts (str or int keys), lists, tuples, tensors and JSON scalars -- enough for the
    state dicts of torch optimizers, LR schedulers and GradScaler, stored without pickle.
    Tensors are named by their path ("state.0.exp_avg"), prefixed with `prefix.` if given.
    Subclasses (OrderedDict, namedtuple, numpy float64) come back as the base type.
    """
    tensors: dict[str, Tensor] = {}

    def encode(x: Any, path: list[str | int]) -> Any:
        if x is None or isinstance(x, (bool, int, float, str)):
            return _base_scalar(x)
        if isinstance(x, Tensor):
            base = ".".join(map(str, [prefix, *path] if prefix else path)) or "tensor"
            name, n = base, 1
            while name in tensors:  # e.g. keys 0 and "0", or "a.b" next to {"a": {"b": ...}}
                name, n = f"{base}~{n}", n + 1
            tensors[name] = x
            return {_TENSOR: name}
        if isinstance(x, list):
            return [encode(v, [*path, i]) for i, v in enumerate(x)]
        if isinstance(x, tuple):
            return {_TUPLE: [encode(v, [*path, i]) for i, v in enumerate(x)]}
        if isinstance(x, Mapping):
            for k in x:
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise TypeError(
                        f"{_pathstr(path)} has the {type(k).__name__} key {k!r}: only str and int keys are supported"
                    )
            if all(type(k) is str and k not in _TAGS for k in x):
                return {k: encode(v, [*path, k]) for k, v in x.items()}
            return {_DICT: [[_base_scalar(k), encode(v, [*path, k])] for k, v in x.items()]}
        raise TypeError(
            f"{_pathstr(path)} is a {type(x).__module__}.{type(x).__qualname__}, which flatten_state cannot store: "
            "supported are dict, list, tuple, Tensor, int, float, bool, None and str (convert it first)"
        )

    return tensors, encode(obj, [])


def unflatten_state(tensors: Mapping[str, Tensor], skeleton: Any) -> Any:
    """Rebuild what `flatten_state` split: `skeleton` with its tensor references filled from `tensors`."""

    def decode(x: Any) -> Any:
        if isinstance(x, list):
            return [decode(v) for v in x]
        if not isinstance(x, dict):
            return x
        if len(x) == 1:
            ((tag, val),) = x.items()
            if tag == _TENSOR:
                if val not in tensors:
                    raise KeyError(f"the skeleton refers to tensor {val!r}, which is not among the tensors given")
                return tensors[val]
            if tag == _TUPLE:
                return tuple(decode(v) for v in val)
            if tag == _DICT:
                return {k: decode(v) for k, v in val}
        return {k: decode(v) for k, v in x.items()}

    return decode(skeleton)


def _base_scalar(x: Any) -> Any:
    """Strip subclasses (IntEnum, numpy float64) so the skeleton holds plain JSON scalars."""
    if x is None or type(x) in (bool, int, float, str):
        return x
    for t in (bool, int, float, str):
        if isinstance(x, t):
            return t(x)
    return x


def _pathstr(path: list[str | int]) -> str:
    return "obj" + "".join(f"[{p!r}]" for p in path)


# ---------------------------------------------------------------------------------------------
# random number generators


def capture_rng() -> tuple[dict[str, Tensor], dict]:
    """The state of python `random`, numpy's global RNG, torch's CPU RNG and every CUDA device's.

    Returned as (tensors, JSON state), ready for a checkpoint group and a state entry; the
    long integer arrays (MT19937 keys) go in the tensors to keep state.json readable.
    """
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    tensors = {
        "python_internal": torch.tensor(internal, dtype=torch.int64),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "torch_cpu": torch.get_rng_state(),
    }
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    for i, s in enumerate(cuda):
        tensors[f"torch_cuda_{i}"] = s
    state = {
        "python": {"version": version, "gauss_next": gauss_next},
        "numpy": {
            "kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)
        },
        "cuda_devices": len(cuda),
    }
    return tensors, state


def restore_rng(tensors: Mapping[str, Tensor], state: Mapping[str, Any]) -> None:
    """Put back what `capture_rng` captured; warns if CUDA states cannot all be restored."""
    try:
        py, npy, n_cuda = state["python"], state["numpy"], state["cuda_devices"]
        internal = tuple(int(v) for v in tensors["python_internal"].tolist())
        keys = tensors["numpy_keys"].numpy().astype(np.uint32)
        cpu = tensors["torch_cpu"]
    except KeyError as e:
        raise ValueError(f"not an RNG state from capture_rng(): missing {e}") from None
    random.setstate((py["version"], internal, py["gauss_next"]))
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(cpu.to("cpu", torch.uint8))
    if not n_cuda:
        return
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i in range(min(n_cuda, have)):
        torch.cuda.set_rng_state(tensors[f"torch_cuda_{i}"].to("cpu", torch.uint8), i)
    if have != n_cuda:
        warnings.warn(
            f"RNG state was captured on {n_cuda} CUDA device(s) but {have} are available now; "
            f"restored {min(n_cuda, have)}, so CUDA random streams will differ from the original run",
            stacklevel=2,
        )


def generator_state(g: torch.Generator) -> Tensor:
    """A torch.Generator's state as a uint8 CPU tensor, to put in a checkpoint group."""
    return g.get_state()


def set_generator_state(g: torch.Generator, state: Tensor) -> None:
    """Restore a torch.Generator from `generator_state`'s tensor."""
    g.set_state(state.to("cpu", torch.uint8))
