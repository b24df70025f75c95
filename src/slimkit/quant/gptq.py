"""GPTQ (Frantar et al., 2023): round weights one input column at a time and push each rounding
error onto the columns not yet rounded, weighted by the inverse Hessian of the layer's inputs.

For a layer computing ``W x``, the output error of quantized weights ``Q`` over calibration
inputs X is ``tr((W - Q) H (W - Q)^T)`` with ``H = X X^T``. Round-to-nearest ignores H; GPTQ
uses it, which matters most at 4 bits and below. Convolutions are handled through their
im2col view (``F.unfold``); grouped and depthwise convolutions keep round-to-nearest.
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..errors import SlimkitError
from ..inputs import Inputs, call


class HessianRecorder(nn.Module):
    """Accumulates ``X X^T`` and the sum of a layer's input columns as calibration batches pass."""

    def __init__(self, columns: int, conv: dict | None = None):
        super().__init__()
        self.conv = conv
        self.register_buffer("hessian", torch.zeros(columns, columns, dtype=torch.float64))
        self.register_buffer("total", torch.zeros(columns, dtype=torch.float64))
        self.count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is not None:
            cols = F.unfold(x, self.conv["kernel"], dilation=self.conv["dilation"], padding=self.conv["padding"],
                            stride=self.conv["stride"])  # (N, C*kh*kw, L)
            cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)
        else:
            cols = x.reshape(-1, x.shape[-1]).T
        cols = cols.double()
        self.hessian += cols @ cols.T
        self.total += cols.sum(1)
        self.count += cols.shape[1]
        return x


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, qmax: int,
                  damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """Quantized ``weight`` (rows = output channels; ``scale`` per element, as broadcast from channels or
    groups; codes in [-qmax, qmax])."""
    w = weight.detach().double().reshape(weight.shape[0], -1).clone()
    h = hessian.clone()
    dead = torch.diag(h) == 0  # inputs that never fire: their weights do not matter
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    try:
        upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError:
        raise SlimkitError("GPTQ: the calibration inputs' Hessian is not positive definite; use more samples")
    s = scale.double().reshape(w.shape)
    q = torch.zeros_like(w)
    for start in range(0, w.shape[1], block):
        end = min(start + block, w.shape[1])
        w_block, err_block = w[:, start:end].clone(), torch.zeros(w.shape[0], end - start, dtype=w.dtype)
        u = upper[start:end, start:end]
        for j in range(end - start):
            col, s_col = w_block[:, j : j + 1], s[:, start + j : start + j + 1]
            q_col = torch.clamp(torch.round(col / s_col), -qmax, qmax) * s_col
            q[:, start + j : start + j + 1] = q_col
            err = (col - q_col) / u[j, j]
            w_block[:, j:] -= err @ u[j : j + 1, j:]
            err_block[:, j : j + 1] = err
        w[:, end:] -= err_block @ upper[start:end, end:]
    return q.reshape(weight.shape).to(weight.dtype)


def record_hessians(gm: fx.GraphModule, ops: list[fx.Node], weight_name, calib: Inputs,
                    batch_size: int = 64) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run calibration data through ``gm``; (input Hessian, input column mean) of each ungrouped weighted op."""
    recorders = {}
    for i, op in enumerate(ops):
        name = weight_name(op)
        weight = gm.get_parameter(name)
        conv = None
        if weight.dim() > 2:
            args = list(op.args) + [None] * 7
            groups = args[6] or 1
            if groups != 1:
                continue
            conv = {"kernel": tuple(weight.shape[2:]), "stride": args[3] or 1, "padding": args[4] or 0,
                    "dilation": args[5] or 1}
        recorder = HessianRecorder(weight[0].numel(), conv)
        gm.add_submodule(f"_slimkit_hessian_{i}", recorder)
        with gm.graph.inserting_before(op):
            node = gm.graph.call_module(f"_slimkit_hessian_{i}", (op.args[0],))
        op.replace_input_with(op.args[0], node)
        recorders[name] = (recorder, node)
    gm.recompile()
    with torch.no_grad():
        for start in range(0, len(calib), batch_size):
            call(gm, calib[start : start + batch_size])
    hessians = {}
    for name, (recorder, node) in recorders.items():
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
        count = max(1, recorder.count)
        hessians[name] = (recorder.hessian / count, recorder.total / count)
    gm.recompile()
    return hessians
