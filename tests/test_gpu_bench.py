"""bench/gpu.py --tiny: the GPU benchmark's own code, run on the CPU with a tiny network, so that the rare GPU run finds
it working (issue 37)."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


@pytest.mark.slow
def test_the_gpu_bench_runs_tiny_on_the_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--tiny", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "gpu.json").read_text())["facts"]["tiny"] is True
    rows = {r["name"]: r for r in report["rows"]}
    assert not [r for r in report["rows"] if "error" in r], [r.get("trace") for r in report["rows"] if "error" in r]
    for name in ("ours bf16 b8", "ours fp32 b8", "peer bf16 b8", "peer fp32 b8", "ours ddim eager", "peer dpmpp-2m eager"):
        assert rows[name]["images_per_s"] > 0, name
    assert rows["ours bf16 b8"]["params"] == rows["peer bf16 b8"]["params"]  # the same architecture on both sides
    assert "torch.compile on a CPU" in rows["ours bf16+cl+compile b8"]["skipped"]
    curve = rows["loss bf16 vs fp32"]
    assert len(curve["curves"]["fp32"]) == 6 and curve["final_gap"] < 0.05 and (tmp_path / "loss_curves.png").is_file()
    costs = rows["network costs"]
    assert costs["forward_gflop_per_image"] > 0 and costs["activation_mb_per_image"] > 0
    assert {lim["row"] for lim in report["limits"]} >= {"train ours fp32 b8", "sample ours ddim eager"}
    assert "train_batch128_vs_peer_best" in report["ratios"]
