"""bench/RESULTS.md, written by the benchmark scripts: one dated section per script and day; and what the scripts
share to write it (the device line, Markdown tables, progress lines, reused run folders)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch

from diffuse.precision import cpu_has_native_bf16
from diffuse.runs import open_run

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_results(section: str, path: Path = RESULTS) -> None:
    """Replace the section of RESULTS.md whose heading (the first line of `section`, "## ...") is the same, or append
    it; every other section is kept."""
    heading = section.splitlines()[0]
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    blocks, current = [], []
    for line in text.splitlines(keepends=True):
        if line.startswith("## ") and current:
            blocks.append("".join(current))
            current = []
        current.append(line)
    blocks.append("".join(current))
    kept = [b.rstrip("\n") for b in blocks if b.splitlines()[0] != heading]
    path.write_text("\n\n".join(kept + [section.rstrip("\n")]) + "\n")


def publish(section: str, no_results: bool) -> None:
    """Print a script's section and, unless no_results, write it into RESULTS.md (`write_results`)."""
    say("\n" + section)
    if not no_results:
        write_results(section)
        say(f"wrote {RESULTS}")


def say(msg: str) -> None:
    print(msg, flush=True)


def table(rows: list[dict], cols: list[str]) -> str:
    """A Markdown table of rows (dicts) in the columns `cols`; floats to 4 significant digits, a missing key blank."""
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows])


def cpu_description() -> str:
    """lscpu's model name and CPU count, and whether the CPU has native bf16 (precision.cpu_has_native_bf16), e.g.
    'AMD EPYC 7B13, 2 CPUs, no native bf16'."""
    bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    try:
        info = dict(line.split(":", 1) for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                    if ":" in line)
        return f"{info['Model name'].strip()}, {info['CPU(s)'].strip()} CPUs, {bf16}"
    except (OSError, KeyError):
        return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {bf16}"


def trained_steps(path: Path) -> int:
    """The step of the newest checkpoint in a run folder; 0 for a folder without a run or without a checkpoint yet."""
    try:
        return open_run(path).step
    except FileNotFoundError:
        return 0
