"""Mixed precision: the one rule for train.mixed_precision and sample.mixed_precision.

Autocast reaches only the network: the trainer's losses and every sampler's update stay in float32 (x_t is float32
and promotes the network's output), so "auto" changes the speed and the rounding of the network, never the math.
"""

from __future__ import annotations

import warnings

import torch


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX tiles or AVX512-BF16), where oneDNN runs bf16
    convolutions faster than fp32. Elsewhere bf16 is emulated and slower. False when torch cannot tell (torch < 2.3)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check() for check in checks if check is not None)


def autocast_dtype(mode: str, device: str | torch.device, key: str = "mixed_precision") -> torch.dtype | None:
    """The autocast dtype of a mixed-precision setting (train.mixed_precision, sample.mixed_precision) on `device`:
    None for fp32. "auto" is bf16 on GPUs with bf16 support and on CPUs with native bf16 (cpu_has_native_bf16; on an
    AMX Xeon 1.2-1.3x the demo's training images/s and 1.6-1.9x its sampling rate, bench/RESULTS.md "CPU budget"),
    fp32 elsewhere. Raises ValueError for an unknown mode and for fp16 on a CPU (`key` names the setting); warns for bf16
    on a CPU without native bf16, where it is emulated and slow."""
    device = torch.device(device)
    if mode not in ("auto", "no", "bf16", "fp16"):
        raise ValueError(f"{key} must be one of auto, no, bf16, fp16; got {mode!r}")
    if mode == "no":
        return None
    if mode == "auto":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else device.type == "cpu" and cpu_has_native_bf16()
        return torch.bfloat16 if native else None
    if mode == "fp16" and device.type != "cuda":
        raise ValueError(f"{key} = 'fp16' needs a CUDA device; use 'bf16' or 'no' on CPU")
    if mode == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn(f"{key} = 'bf16' on a CPU without native bf16 (AMX or AVX512-BF16): bf16 is emulated here and the "
                      "demo network trains about 9x slower than in fp32 (bench/RESULTS.md, \"CPU budget\", fifth run); "
                      "use 'auto' or 'no' for speed", stacklevel=2)
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]
