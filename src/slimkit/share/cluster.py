"""Weight sharing: each layer's weights take one of 2^bits shared values.

``cluster(model, cfg)`` replaces every selected layer's non-zero weights by their
cluster centroid (k-means per layer, or a uniform step ``W' = round(W / step) * step``);
zeros left by pruning stay zero and are not a cluster. ``share_centroids`` then makes
the centroids the trainable parameters (Deep Compression's "trained quantization"):
the assignment of every weight is fixed, and the gradient of a centroid is the sum of
the gradients of the weights that share it, which is what indexing a table gives
under autograd. ``remove_sharing`` bakes the trained centroids back into plain
weights. The model directory stores such a layer as a codebook and n-bit indices.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.nn.utils import parametrize

from ..config import Config
from ..errors import SlimkitError
from ..select import select_layers
from .kmeans import INITS, cluster_1d


class ClusterConfig(Config):
    bits: int = Field(5, ge=1, le=8)  # 2^bits shared values per layer
    layer_bits: dict[str, int] = Field(default_factory=dict)  # per-layer override (glob -> bits)
    method: Literal["kmeans", "uniform"] = "kmeans"
    init: str = "linear"  # linear | density | random | optimal (exact 1-D k-means)
    iters: int = Field(100, ge=1)
    biases: bool = False  # share the selected layers' biases too (their own codebook, same bits)
    # float16: shared values rounded to half precision, so a codebook takes 2 bytes per entry in a .slim file
    codebook_dtype: Literal["float32", "float16"] = "float32"
    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)
    seed: int = 0

    def model_post_init(self, __context: Any) -> None:
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        bad = {k: v for k, v in self.layer_bits.items() if not 1 <= v <= 8}
        if bad:
            raise ValueError(f"layer_bits must be between 1 and 8, got {bad}")

    def bits_of(self, layer: str) -> int:
        from fnmatch import fnmatchcase

        return next((b for pattern, b in self.layer_bits.items() if fnmatchcase(layer, pattern)), self.bits)


@torch.no_grad()
def cluster(model: nn.Module, cfg: ClusterConfig | None = None) -> dict[str, Any]:
    """Cluster the selected layers' weights in place; returns per-layer statistics and the codebooks."""
    cfg = cfg or ClusterConfig()
    rows = []
    for name, module in select_layers(model, cfg.include, cfg.exclude):
        params = ["weight"] + (["bias"] if cfg.biases and getattr(module, "bias", None) is not None else [])
        for param in params:
            tensor_name = f"{name}.{param}" if name else param
            rows.append({"layer": name, "tensor": tensor_name,
                         **_cluster_tensor(tensor_name, getattr(module, param), cfg.bits_of(name), cfg)})
    return {"method": cfg.method, "init": cfg.init, "layers": rows}


def _cluster_tensor(name: str, tensor: torch.Tensor, bits: int, cfg: ClusterConfig) -> dict[str, Any]:
    """Replace the non-zero values of ``tensor`` (in place) by their shared values; returns its statistics."""
    if not torch.isfinite(tensor).all():
        raise SlimkitError(f"cannot cluster {name}: it holds NaN or Inf")
    nonzero = tensor != 0
    values = tensor[nonzero].double().numpy()
    if cfg.method == "uniform":
        centroids, labels = _uniform(values, bits)
    else:
        centroids, labels = cluster_1d(values, 2**bits, cfg.init, cfg.iters, cfg.seed)
    shared = torch.zeros_like(tensor)
    shared[nonzero] = torch.from_numpy(centroids[labels]).to(tensor.dtype)
    if cfg.codebook_dtype == "float16":
        shared = round_to_half(shared)
    error = float(((tensor.double() - shared.double()) ** 2).sum())
    tensor.copy_(shared)
    return {"weights": tensor.numel(), "nonzero": int((shared != 0).sum()), "bits": bits,
            "clusters": int((centroids != 0).sum()), "sse": error}


def _uniform(values: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform sharing ``round(W / step) * step``: 2^bits non-zero levels spanning the weights.

    A weight that rounds to level 0 becomes an exact zero (stored as a pruned one).
    """
    if values.size == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    half = 2 ** (bits - 1)
    step = np.abs(values).max() / half
    codes = np.clip(np.round(values / step), -half, half)
    used, labels = np.unique(codes, return_inverse=True)
    return used * step, labels.reshape(-1)


def round_to_half(tensor: torch.Tensor) -> torch.Tensor:
    """Values rounded to the nearest float16 (kept in the tensor's dtype); zeros stay zero."""
    return tensor.half().to(tensor.dtype)


class SharedCentroids(nn.Module):
    """Parametrization: the weight is ``table[index]``; the table (0 first, then the centroids) trains."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        values, index = torch.unique(weight.detach(), return_inverse=True)
        zero = (values == 0).nonzero()
        if len(zero):  # a pruned zero stays exactly zero: it is not a trainable centroid
            z = int(zero[0])
            values = torch.cat([values[:z], values[z + 1 :]])
            index = torch.where(index == z, -1, torch.where(index > z, index - 1, index))
        self.centroids = nn.Parameter(values.clone())
        self.register_buffer("index", (index + 1).to(torch.int64))

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        table = torch.cat([self.centroids.new_zeros(1), self.centroids])
        return table[self.index]


def share_centroids(model: nn.Module, tensors: list[str], max_clusters: int = 256) -> None:
    """Make the centroids of clustered ``tensors`` (``"fc1.weight"``) trainable; assignments stay fixed."""
    for name in tensors:
        owner, _, param = name.rpartition(".")
        module = model.get_submodule(owner)
        count = int(torch.unique(getattr(module, param).detach()).numel())
        if count > max_clusters + 1:
            raise SlimkitError(f"{name} has {count} distinct values: cluster it before sharing centroids")
        parametrize.register_parametrization(module, param, SharedCentroids(getattr(module, param)))
        module.parametrizations[param].original.requires_grad_(False)  # unused: the centroids are what trains


def remove_sharing(model: nn.Module) -> nn.Module:
    """Bake trained centroids into plain tensors (the shared values and zeros stay exact)."""
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for param in list(module.parametrizations):
            if any(isinstance(p, SharedCentroids) for p in module.parametrizations[param]):
                parametrize.remove_parametrizations(module, param, leave_parametrized=True)
                getattr(module, param).requires_grad_(True)
    return model
