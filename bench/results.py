"""bench/RESULTS.md, written by the benchmark scripts: one dated section per script and day."""

from __future__ import annotations

from pathlib import Path

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
