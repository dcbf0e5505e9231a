"""The pictures the README shows, made again from the real commands: the demo's figures, the toy's, and screenshots of
the web page serving the demo's model.

    python docs/make_readme_figures.py [--demo demo] [--no-screenshots]

Runs `diffuse demo --out DEMO` (about 9 minutes on a CPU; a finished demo folder only redraws its figures), copies its
samples, forward process, reverse trajectory and GIF to docs/figures/, runs `diffuse demo --toy` into
docs/figures/toy/, and, unless --no-screenshots, takes the Sample and Edit tabs of `diffuse serve DEMO/run/posthoc_ema`
in headless Chromium into docs/screenshots/ (tests/test_webui.py's `screenshots`; needs the [ui] and [test] extras and
Debian's chromium and chromium-driver).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
DEMO_FIGURES = ("samples.png", "forward_process.png", "reverse_trajectory.png", "denoising.gif")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, default=ROOT / "demo", help="the demo folder (trained, or resumed, here)")
    p.add_argument("--no-screenshots", action="store_true", help="leave docs/screenshots as they are")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from diffuse.app.demo import run_demo
    from diffuse.app.toy import run_toy_demo

    paths = run_demo(args.demo)
    (DOCS / "figures").mkdir(exist_ok=True)
    for name in DEMO_FIGURES:
        shutil.copyfile(args.demo / name, DOCS / "figures" / name)
    run_toy_demo(DOCS / "figures" / "toy")
    if not args.no_screenshots:
        sys.path.insert(0, str(ROOT / "tests"))
        from test_webui import screenshots

        screenshots([str(paths["sampled weights"])], DOCS / "screenshots")
    print(f"wrote docs/figures and{'' if args.no_screenshots else ' docs/screenshots and'} docs/figures/toy")


if __name__ == "__main__":
    main()
