"""SDEdit of stroke drawings of digits (issue "Image-to-image and editing"): faithfulness against realism over the
strength, as in the SDEdit paper (Meng et al. 2022, fig. 4).

Strokes: the held-out digits of scikit-learn (other writers than the bundled MNIST the model learnt; 8x8 at 17
grey levels), scaled to 20x20 and centred in 28x28 as MNIST is, cut at half intensity, thinned to a skeleton and
drawn 3 pixels wide in flat white: a pen drawing of the digit with none of the grey edges of a scanned one. Each is edited by the trained demo-recipe
run (configs/mnist_cond.toml, bench/out/processes/mnist_cond; trained here with --budget seconds if missing)
with SDEdit at strengths 0.2 .. 1, unconditionally (the null label: the model is not told the digit) and told the
digit (its label, at the run's guidance w = 1), with the run's sampler (DPM-Solver++(2M), 20 steps over the full grid). Reported per strength: the digit classifier's
accuracy on the intended digit (does the edit keep the drawing's meaning?), FID against the 5,000 bundled digits
in the classifier's feature space (does it look like a handwritten digit?) and the mean L2 distance per pixel
to the strokes (faithfulness, in [0, 1] units).

    python bench/editing.py --n 1000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffuse.config import apply_overrides, load_config
from diffuse.data import load_dataset
from diffuse.metrics import fid
from diffuse.nets.digits import classifier_accuracy
from diffuse.train import digit_classifier
from diffuse.runs import load_run
from diffuse.tasks import sdedit
from diffuse.train import train
from diffuse.visualize import save_grid, to_uint8

ROOT = Path(__file__).resolve().parents[1]


def strokes(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n pen drawings (n, 1, 28, 28) in [-1, 1] of scikit-learn's digits, and their labels: each digit scaled to 20x20
    and centred in 28x28 as MNIST is, cut at half intensity, thinned to its skeleton and drawn 3 pixels wide in flat
    white (scikit-image's skeletonize and dilation)."""
    from skimage.morphology import dilation, disk, skeletonize
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images[:n]).float()[:, None] / 16.0                     # (n, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(20, 20), mode="bicubic", align_corners=False)
    x = F.pad(x, (4, 4, 4, 4)) > 0.5                                                # MNIST: 20x20 centred in 28x28
    drawn = np.stack([dilation(skeletonize(b), disk(1)) for b in x[:, 0].numpy()])
    return torch.from_numpy(drawn).float()[:, None] * 2 - 1, torch.from_numpy(d.target[:n]).long()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--run", default=str(ROOT / "bench" / "out" / "processes" / "mnist_cond"))
    p.add_argument("--budget", type=float, default=480, help="training seconds if --run does not exist yet")
    p.add_argument("--strengths", default="0.34,0.49,0.61,0.72,0.86,0.96,1.0",  # sigma/alpha = s / (1 - s) (issue 38)
                   help="SDEdit strengths (default: the starts of t0 / t_top = 0.15 .. 1 on the linear VP schedule)")
    args = p.parse_args()
    run = Path(args.run)
    if not (run / "config.toml").is_file():
        train(apply_overrides(load_config(ROOT / "configs" / "mnist_cond.toml"), [f"train.time_limit={args.budget}"]), run,
              progress=False)
    cfg, den, num_classes = load_run(run)
    s = cfg.sample
    classifier = digit_classifier()
    real = torch.stack([x for x, _ in load_dataset(cfg.data)])
    guide, labels = strokes(args.n)
    null = {"label": torch.full((args.n,), num_classes)}  # unconditional: the model is not told the digit

    def row(name, x):
        x = torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).float() / 127.5 - 1  # as saved: 8 bits
        return {"strength": name, "accuracy": round(classifier_accuracy(classifier, x, labels), 3),
                "fid": round(fid(real, x, classifier), 2),
                "l2_to_strokes": round(float(((x - guide) / 2).pow(2).mean((1, 2, 3)).sqrt().mean()), 3)}

    rows = [{"mode": "-", **row("strokes", guide)}]
    print(json.dumps(rows[-1]), flush=True)
    shown = [guide[:10]]
    for mode in ("unconditional", "told the digit"):
        kw = dict(cond=null) if mode == "unconditional" else dict(labels=labels, guidance=s.guidance)
        for strength in (float(v) for v in args.strengths.split(",")):
            x = sdedit(den, guide, strength, sampler=s.sampler, steps=s.steps, seed=0, **kw)
            rows.append({"mode": mode, **row(strength, x)})
            shown.append(x[:10])
            print(json.dumps(rows[-1]), flush=True)
    save_grid(torch.cat(shown), ROOT / "bench" / "out" / "editing_sdedit.png", nrow=10, scale=2)
    print("\n| SDEdit | strength | digit accuracy | FID (digit features) | L2 to strokes |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['strength']} | {r['accuracy']:.1%} | {r['fid']} | {r['l2_to_strokes']} |")


if __name__ == "__main__":
    main()
