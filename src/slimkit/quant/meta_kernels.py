"""Shape-only (Meta) kernels torch lacks for its fake-quantization ops.

``torch.export`` with a dynamic batch runs every op on Meta tensors; the
``*_cachemask`` variants that fake quantization dispatches to have no Meta
kernel in this PyTorch, so a quantized model with a dynamic batch could not be
exported to ONNX. Registered on first use (never at import), only where missing.
"""

from __future__ import annotations

import torch

_LIBRARIES: list[torch.library.Library] = []  # registrations live as long as their Library object

CACHEMASK_OPS = (
    "fake_quantize_per_tensor_affine_cachemask",
    "_fake_quantize_per_tensor_affine_cachemask_tensor_qparams",
    "fake_quantize_per_channel_affine_cachemask",
)


def _shape_only(x: torch.Tensor, *args):
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)


def ensure_fake_quant_meta_kernels() -> None:
    missing = [op for op in CACHEMASK_OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", "Meta")]
    if not missing:
        return
    lib = torch.library.Library("aten", "IMPL")
    for op in missing:
        lib.impl(op, _shape_only, "Meta")
    _LIBRARIES.append(lib)
