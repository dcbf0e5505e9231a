"""Which third-order DPM-Solver++ update to make the default (issue: "Which third-order update is better in
practice"): ours, whose D2 estimate makes 3M third order on smooth problems, against the reference update of the
DPM-Solver code and diffusers (`reference_3m=True`, second order in the limit).

    python bench/third_order.py --run bench/out/cond [--n 1000]

1. Digits: --n samples of a configs/mnist_cond.toml run (labels 0..9 in turn, the run's guidance weight) with
   dpmpp-3m on 10 and 20 trailing steps, each update; FID against the 5,000 bundled digits in the digit-classifier
   feature space (samples rounded to 8 bits as `diffuse eval` does). Same seeds for both updates.
2. The 2-D three-Gaussian mixture of tests/test_solvers.py with its exact denoiser (linear schedule, 20,000
   samples): the covariance error at 10 and 20 steps on every spacing, each update.
Prints one JSON line per row; the tables go into bench/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from diffuse.data import load_dataset
from diffuse.metrics import fid
from diffuse.train import digit_classifier
from diffuse.runs import load_run
from diffuse.visualize import to_uint8

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]
from samplers import draw  # noqa: E402  (bench/samplers.py)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run", default=str(ROOT / "bench" / "out" / "cond"))
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--skip-digits", action="store_true")
    args = p.parse_args()
    if not args.skip_digits:
        cfg, den, num_classes = load_run(args.run)
        d = cfg.data
        shape = (d.channels, d.image_size, d.image_size)
        real = torch.stack([x for x, _ in load_dataset(d)])
        labels = torch.arange(args.n) % num_classes
        classifier = digit_classifier()
        for steps in (10, 20):
            for reference in (False, True):
                x, nfe, seconds = draw(den, args.n, shape, labels, sampler="dpmpp-3m", steps=steps, spacing="trailing",
                                       guidance=cfg.sample.guidance, reference_3m=reference)
                x = torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).float() / 127.5 - 1
                print(json.dumps({"data": "digits", "steps": steps, "reference_3m": reference, "guidance": cfg.sample.guidance,
                                  "nfe": nfe, "seconds": round(seconds, 1), "fid": round(fid(real, x, classifier), 3)}), flush=True)
    from test_solvers import SPACINGS_OFFERED, covariance_error  # the mixture and its exact denoiser

    for steps in (10, 20):
        for spacing in SPACINGS_OFFERED:
            row = {name: round(covariance_error("linear", "eps", "dpmpp-3m", spacing, steps, 1.0, n=20000, reference_3m=ref), 4)
                   for name, ref in (("ours", False), ("reference", True))}
            print(json.dumps({"data": "mixture", "steps": steps, "spacing": spacing, **row}), flush=True)


if __name__ == "__main__":
    main()
