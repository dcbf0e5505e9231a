"""Where a training run's numbers and pictures go: the trackers that train.log_to names, each writing inside the run
folder (rank 0 only; the Trainer opens them).

    jsonl        RUN/log.jsonl: one JSON object per log line and per measurement (the default; `diffuse serve`,
                 checkpoint.read_log and the tests read it)
    csv          RUN/log.csv: rows step,name,value (long form: the names a kind logs may change during a run, e.g. an
                 autoencoder's discriminator starts late), read with the csv module or pandas
    tensorboard  RUN/tensorboard/: event files through torch.utils.tensorboard (the extra: pip install tensorboard);
                 `tensorboard --logdir RUN/tensorboard`
    wandb        RUN/wandb/: a Weights & Biases run (the extra: pip install wandb), offline unless WANDB_MODE says
                 otherwise (a run never waits on the network); `wandb sync RUN/wandb/offline-run-*` uploads it

Every tracker gets the same scalars: a record's numbers by name, nested records flattened to "outer/inner" (a
segmentation run's "iou/background"); RUN/log.jsonl keeps each record whole, as it always has. The trackers that hold
pictures (tensorboard, wandb) get the same pictures: each sample grid the kind writes (RUN/samples/step_N.png) and the
loss figure with its FID curve (RUN/loss.png, drawn at each checkpoint); the file trackers leave those files where
they are. A resumed run appends to the files; TensorBoard drops the events an interrupted run wrote past the step it
resumes from (SummaryWriter's purge_step), and so do log.jsonl and log.csv; W&B keeps them (its history cannot be rewound offline). A W&B run whose
training raised is marked failed (exit code 1).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import secrets
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from .checkpoint import open_log, write_atomically

TrackerName = Literal["jsonl", "csv", "tensorboard", "wandb"]  # train.log_to's values (TRACKERS' keys; a test keeps them equal)

EXTRAS = {"tensorboard": ("tensorboard", "pip install tensorboard"), "wandb": ("wandb", "pip install wandb")}
"""A tracker that needs an optional package: (the package imported, the command that installs it)."""


def check_trackers(names: list[str]) -> None:
    """ValueError naming train.log_to and the fix when `names` is empty, repeats a tracker, names an unknown one, or names
    one whose package is not installed (with the pip command that installs it); nothing is imported."""
    if not names:
        raise ValueError("train.log_to is empty, so the run would keep no record of its losses; name at least one of "
                         f"{', '.join(map(repr, TRACKERS))} (the default is ['jsonl'])")
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"train.log_to names {name!r}, which is not a tracker; choose from {', '.join(map(repr, TRACKERS))}")
    if len(set(names)) != len(names):
        raise ValueError(f"train.log_to = {names} names a tracker twice; name each once")
    for name in names:
        package, install = EXTRAS.get(name, (None, None))
        if package is not None and importlib.util.find_spec(package) is None:
            raise ValueError(f"train.log_to names {name!r}, but the {package} package is not installed: {install} "
                             f"(in a clone: pip install -e \".[track]\"), or remove {name!r} from train.log_to")


def scalars_of(record: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a record by name: nested dicts flattened to "outer/inner", bools and ints as floats; strings,
    lists and None (an IoU of a class that never occurs) left out."""
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars_of(value, f"{name}/"))
        elif isinstance(value, (int, float)):  # bool is an int
            out[name] = float(value)
    return out


def read_png(path: str | os.PathLike) -> np.ndarray:
    """A PNG the run wrote as (H, W, 3) uint8 (gray images repeated over the channels)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


class JsonlTracker:
    """RUN/log.jsonl: each record whole, {"step": N, ...} on a line of its own (checkpoint.open_log cuts a line a kill
    tore first); pictures stay the run folder's own files."""

    def __init__(self, run_dir: Path, step: int, config: dict):
        # resumed from `step`: what an interrupted run logged past it is dropped, as TensorBoard's purge_step does
        self.log = open_log(run_dir / "log.jsonl", keep=lambda line: json.loads(line).get("step", 0) <= step)

    def scalars(self, step: int, record: dict) -> None:
        self.log.write(json.dumps({"step": step, **record}) + "\n")

    def image(self, step: int, name: str, path: Path) -> None:
        pass  # the grid or figure is the run folder's file at `path`

    def close(self, failed: bool = False) -> None:
        self.log.close()


class CsvTracker:
    """RUN/log.csv: one row step,name,value per number (long form), the header written when the file starts."""

    HEADER = ("step", "name", "value")

    def __init__(self, run_dir: Path, step: int, config: dict):
        path = run_dir / "log.csv"
        new = not path.exists() or path.stat().st_size == 0
        # a row a kill tore is cut, and rows past the step it resumes from, as in log.jsonl
        self.log = open_log(path, keep=lambda line: not line[:1].isdigit() or int(line.split(b",", 1)[0]) <= step)
        if new:
            self._rows([self.HEADER])

    def _rows(self, rows) -> None:
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        self.log.write(text.getvalue())

    def scalars(self, step: int, record: dict) -> None:
        self._rows([(step, name, repr(value)) for name, value in scalars_of(record).items()])  # repr: floats exactly

    def image(self, step: int, name: str, path: Path) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        self.log.close()


class TensorBoardTracker:
    """RUN/tensorboard/: scalars (add_scalar), pictures (add_image, HWC), and at a run's start its config as text."""

    def __init__(self, run_dir: Path, step: int, config: dict):
        from torch.utils.tensorboard import SummaryWriter  # the optional extra, checked by check_trackers

        # resumed from `step`: what an interrupted run wrote past it is dropped (the next event is at step + 1)
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=step + 1)
        if step == 0:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```", 0)

    def scalars(self, step: int, record: dict) -> None:
        for name, value in scalars_of(record).items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def image(self, step: int, name: str, path: Path) -> None:
        self.writer.add_image(name, read_png(path), step, dataformats="HWC")
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbTracker:
    """RUN/wandb/: a W&B run named after the run folder, its id kept in RUN/wandb/run_id so a resumed run continues it;
    offline unless the user set WANDB_MODE; the project is $WANDB_PROJECT, else "diffuse"; console capture off (the
    progress bar stays the terminal's)."""

    def __init__(self, run_dir: Path, step: int, config: dict):
        import wandb  # the optional extra, checked by check_trackers

        folder = run_dir / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / "run_id"
        if id_file.is_file() and id_file.read_text().strip():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(4)  # 8 characters of [0-9a-f], as W&B's own ids
            write_atomically(id_file, run_id.encode())
        self.wandb = wandb
        self.run = wandb.init(dir=str(run_dir), project=os.environ.get("WANDB_PROJECT") or "diffuse", name=run_dir.name,
                              id=run_id, resume="allow", config=config,
                              mode=None if os.environ.get("WANDB_MODE") else "offline",
                              settings=wandb.Settings(console="off", silent=True))

    def scalars(self, step: int, record: dict) -> None:
        self.run.log(scalars_of(record), step=step)

    def image(self, step: int, name: str, path: Path) -> None:
        self.run.log({name: self.wandb.Image(str(path))}, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


TRACKERS = {"jsonl": JsonlTracker, "csv": CsvTracker, "tensorboard": TensorBoardTracker, "wandb": WandbTracker}


class Trackers:
    """The trackers of train.log_to, opened on a run folder at `step` (0 for a new run, else the step it resumes from)
    with the run's `config` ({section: {key: value}}); `scalars`, `image` and `close` go to each in turn. ValueError as
    check_trackers."""

    def __init__(self, names: list[str], run_dir: str | os.PathLike, step: int = 0, config: dict | None = None):
        check_trackers(names)
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.trackers = []
        try:
            for name in names:
                self.trackers.append(TRACKERS[name](run_dir, step, config or {}))
        except BaseException:
            self.close(failed=True)
            raise

    def scalars(self, step: int, record: dict) -> None:
        """A record of numbers at `step` (nested dicts allowed; what is not a number only log.jsonl keeps)."""
        for tracker in self.trackers:
            tracker.scalars(step, record)

    def image(self, step: int, name: str, path: str | os.PathLike) -> None:
        """A PNG the run wrote (a sample grid, a figure) shown as `name` at `step` by the trackers that hold pictures."""
        for tracker in self.trackers:
            tracker.image(step, name, Path(path))

    def close(self, failed: bool = False) -> None:
        """Close every tracker (each is tried, the first error raised after); `failed`: the run stopped on an error."""
        error = None
        for tracker in self.trackers:
            try:
                tracker.close(failed)
            except Exception as e:  # noqa: BLE001 - the others still close
                error = error or e
        self.trackers = []
        if error is not None:
            raise error
