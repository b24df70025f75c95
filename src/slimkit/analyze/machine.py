"""Where a measurement was taken: the CPU and its vector and matrix extensions, cores, runtime versions.

Speed depends on them more than on anything else (an int8 kernel is several times faster than fp32
on a CPU with VNNI or AMX, and barely faster without), so every report that times a model says them.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Any

ISA_FLAGS = {  # /proc/cpuinfo flag -> name; the extensions integer and matrix kernels use
    "avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX-512 BF16", "amx_tile": "AMX", "amx_int8": "AMX-INT8", "amx_bf16": "AMX-BF16",
    "asimd": "NEON", "asimddp": "NEON dot product", "i8mm": "I8MM", "sve": "SVE",
}


def _cpuinfo() -> tuple[str, set[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    model, flags = platform.machine(), set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == platform.machine():
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


@functools.cache
def int8_pairs_saturate() -> bool:
    """True on an x86 CPU without VNNI or AMX: there ONNX Runtime's uint8 x int8 kernels add pairs of
    products in 16 bits (``vpmaddubsw``), which saturate once two products of a uint8 activation and an 8-bit
    weight code pass 32767 (255 * 127 * 2 = 64770); 7-bit codes (+/-63) cannot. With VNNI or AMX the products
    are summed in 32 bits. Unknown (no /proc/cpuinfo) reads as False."""
    _, flags = _cpuinfo()
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    return x86 and "avx2" in flags and not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


def nbits_accuracy_level() -> int:
    """The compute ONNX Runtime should use for 4-bit weights (MatMulNBits' ``accuracy_level``): 0 (float, the
    weights dequantized in blocks) where ``int8_pairs_saturate``, else 4 (activations quantized to int8 per
    block, the default of ONNX Runtime's QDQ fusion). Measured on all-MiniLM-L6-v2, 4-bit weights, AMD EPYC
    with AVX2 only, ORT 1.32: level 4 ran 1.41x the fp32 model's time at 8 x 128 tokens and level 0 1.13x."""
    return 0 if int8_pairs_saturate() else 4


def machine_fingerprint(threads: int | None = None) -> dict[str, Any]:
    import torch

    from ..limits import available_cores

    model, flags = _cpuinfo()
    out: dict[str, Any] = {
        "cpu": model, "architecture": platform.machine(),
        "isa": [name for flag, name in ISA_FLAGS.items() if flag in flags],
        "cores": available_cores(), "torch": torch.__version__, "python": platform.python_version(),
    }
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
        out["onnxruntime_provider"] = "CPUExecutionProvider"  # slimkit's sessions (export.onnx.ort_session)
    except ImportError:
        pass
    if threads is not None:
        out["threads"] = threads
    return out


def describe_machine(fingerprint: dict[str, Any]) -> str:
    """One line: "AMD EPYC (AVX2, AVX-512, AVX-512 VNNI), 2 cores, torch 2.13.0, ONNX Runtime 1.32.0, 1 thread"."""
    isa = f" ({', '.join(fingerprint['isa'])})" if fingerprint.get("isa") else ""
    parts = [f"{fingerprint['cpu']}{isa}", f"{fingerprint['cores']} cores", f"torch {fingerprint['torch']}"]
    if "onnxruntime" in fingerprint:
        parts.append(f"ONNX Runtime {fingerprint['onnxruntime']} ({fingerprint['onnxruntime_provider']})")
    if "threads" in fingerprint:
        parts.append(f"{fingerprint['threads']} thread{'s' if fingerprint['threads'] != 1 else ''}")
    return ", ".join(parts)
