"""Low-rank factorization by truncated SVD: one layer becomes two thinner ones.

* Linear ``W [out, in]``: ``Linear(in, r)`` then ``Linear(r, out)`` (``W ~ U_r S_r V_r^T``,
  the singular values split evenly between the two factors).
* Convolution, ``channel``: a k x k convolution to ``r`` channels, then a 1x1 convolution
  to ``out`` (SVD of ``W`` viewed as ``[out, in*kh*kw]``).
* Convolution, ``spatial``: a ``kh x 1`` convolution to ``r`` channels, then a ``1 x kw``
  one to ``out`` (SVD of ``W`` viewed as ``[in*kh, out*kw]``; Jaderberg et al., 2014).

The rank of each layer comes from a fixed ``rank``, a retained ``energy`` (fraction of the
sum of squared singular values), or a ``budget`` (fraction of the selected layers'
parameters, or MACs, to keep, spent on the singular directions with most energy per
parameter or MAC).
A layer is factorized only where that lowers both its parameters and its MACs. The
factorization is a plan step, so the model directory reloads it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..config import Config
from ..errors import SlimkitError
from ..inputs import call
from ..plan import StepSchema, register_plan_op
from ..select import select_layers

PLAN_OP = "factorize"
RANK_RULES = ("rank", "energy", "budget", "min_score")  # how ranks are chosen: exactly one


class FactorizedLayer(Config):
    kind: Literal["linear", "channel", "spatial"]
    rank: int = Field(ge=1)


class FactorizeStep(StepSchema):
    op: Literal["factorize"] = PLAN_OP
    layers: dict[str, FactorizedLayer] = Field(min_length=1)


class FactorizeConfig(Config):
    rank: int | None = Field(None, ge=1)
    energy: float | None = Field(None, gt=0, le=1)
    budget: float | None = Field(None, gt=0, lt=1)
    budget_of: Literal["params", "macs"] = "params"  # what the budget is a fraction of
    conv: Literal["channel", "spatial"] = "channel"
    # the lowest validation score the factorized model may have before fine-tuning: the energy of all selected
    # layers is then the lowest that keeps it (lowrank.search), measured on the task
    min_score: float | None = None
    # factorize a layer only where its MACs fall by at least this fraction: two thinner GEMMs cost more per MAC
    # than one (ONNX Runtime fp32 on AVX2, 1024 rows: no faster until the MACs fall to about 0.7-0.8x)
    min_saving: float = Field(0.0, ge=0, lt=1)
    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _default_energy(cls, data: Any) -> Any:
        """Without rank, energy, budget or min_score, keep 90% of each layer's singular energy."""
        if isinstance(data, dict) and all(data.get(k) is None for k in RANK_RULES):
            return {**data, "energy": 0.9}
        return data

    def model_post_init(self, __context: Any) -> None:
        given = [k for k in RANK_RULES if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of rank, energy, budget or min_score (got {', '.join(given) or 'none'})")


def _matrix(module: nn.Module, kind: str) -> torch.Tensor:
    w = module.weight.detach().double()
    if kind == "linear":
        return w
    if kind == "channel":
        return w.reshape(w.shape[0], -1)
    out, cin, kh, kw = w.shape  # spatial: rows (c, y), columns (o, x)
    return w.permute(1, 2, 0, 3).reshape(cin * kh, out * kw)


def _kind(module: nn.Module, conv: str) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros":
        if conv == "spatial" and (1 in module.kernel_size or isinstance(module.padding, str)):
            return None  # already separable, or padding that cannot be split by axis
        return conv
    return None


def _costs(module: nn.Module, kind: str, out_hw: tuple[int, int], mid_hw: tuple[int, int]) -> dict[str, Any]:
    """Parameters and MACs of the layer and, per unit of rank, of its factorization."""
    w = module.weight
    if kind == "linear":
        out, cin = w.shape
        return {"params": out * cin, "macs": out * cin, "per_rank_params": cin + out, "per_rank_macs": cin + out}
    out, cin, kh, kw = w.shape
    positions = out_hw[0] * out_hw[1]
    full = {"params": out * cin * kh * kw, "macs": out * cin * kh * kw * positions}
    if kind == "channel":
        return {**full, "per_rank_params": cin * kh * kw + out, "per_rank_macs": (cin * kh * kw + out) * positions}
    return {**full, "per_rank_params": cin * kh + out * kw,
            "per_rank_macs": cin * kh * mid_hw[0] * mid_hw[1] + out * kw * positions}


def _output_sizes(model: nn.Module, example: torch.Tensor, names: list[str]) -> dict[str, tuple]:
    """Each conv's output (h, w) and the (h, w) after only its vertical stride (the spatial split's middle)."""
    sizes, hooks = {}, []
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Conv2d):
            def hook(m, inputs, output, name=name):
                sizes[name] = (tuple(output.shape[-2:]), (output.shape[-2], inputs[0].shape[-1]))
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            call(model.eval(), example[:1])
    finally:
        for h in hooks:
            h.remove()
    return sizes


def _ranks(candidates: list[dict[str, Any]], cfg: FactorizeConfig) -> None:
    """Set ``rank`` on each candidate (None: leave the layer as it is)."""
    if cfg.budget is None:
        for c in candidates:
            s2 = c["s"] ** 2
            if cfg.rank is not None:
                r = min(cfg.rank, len(s2))
            else:
                kept = torch.cumsum(s2, 0) / s2.sum()
                r = int(torch.searchsorted(kept, torch.tensor(cfg.energy, dtype=kept.dtype) - 1e-12)) + 1
            c["rank"] = min(r, len(s2))
    else:
        key = cfg.budget_of
        total = sum(c["costs"][key] for c in candidates)
        units = sorted(((float(s2 / c["s"].pow(2).sum()) / c["costs"][f"per_rank_{key}"], i, j)
                        for i, c in enumerate(candidates) for j, s2 in enumerate(c["s"] ** 2)), reverse=True)
        for c in candidates:
            c["rank"] = 0
        spent = 0
        for _, i, _j in units:  # directions of one layer come in order of their singular values
            cost = candidates[i]["costs"][f"per_rank_{key}"]
            if spent + cost > cfg.budget * total:
                continue
            candidates[i]["rank"] += 1
            spent += cost
        for c in candidates:
            c["rank"] = max(c["rank"], 1)
    for c in candidates:
        costs = c["costs"]
        macs = c["rank"] * costs["per_rank_macs"]
        if (c["rank"] * costs["per_rank_params"] >= costs["params"] or macs >= costs["macs"]
                or macs > (1 - cfg.min_saving) * costs["macs"]):
            c["rank"] = None  # no saving, or too little to run faster: keep the layer


@torch.no_grad()
def factorize(model: nn.Module, example: torch.Tensor, cfg: FactorizeConfig,
              ) -> tuple[nn.Module, dict[str, Any], list[dict[str, Any]]]:
    """Factorize the selected layers in place; returns the model, its plan step and per-layer rows."""
    if cfg.min_score is not None:
        raise SlimkitError("min_score chooses ranks by a measured score: use lowrank.search.factorize_for_score, "
                           "or the factorize stage or verb with data to score on")
    layers = [(n, m, _kind(m, cfg.conv)) for n, m in select_layers(model, cfg.include, cfg.exclude)]
    layers = [(n, m, k) for n, m, k in layers if k is not None]
    sizes = _output_sizes(model, example, [n for n, _, _ in layers])
    candidates = []
    for name, module, kind in layers:
        if not torch.isfinite(module.weight).all():
            raise SlimkitError(f"cannot factorize {name}: its weight holds NaN or Inf")
        u, s, vh = torch.linalg.svd(_matrix(module, kind), full_matrices=False)
        out_hw, mid_hw = sizes.get(name, ((1, 1), (1, 1)))
        candidates.append({"name": name, "module": module, "kind": kind, "u": u, "s": s, "vh": vh,
                           "costs": _costs(module, kind, out_hw, mid_hw)})
    _ranks(candidates, cfg)
    step: dict[str, Any] = {"op": PLAN_OP, "layers": {}}
    rows = []
    for c in candidates:
        s2 = c["s"] ** 2
        row = {"layer": c["name"], "kind": c["kind"], "max_rank": len(s2), "params_before": c["costs"]["params"],
               "macs_before": c["costs"]["macs"]}
        if c["rank"] is not None:
            r = c["rank"]
            _replace(model, c["name"], _factors(c["module"], c["kind"], c["u"], c["s"], c["vh"], r))
            step["layers"][c["name"]] = {"kind": c["kind"], "rank": r}
            row.update(rank=r, energy=float(s2[:r].sum() / s2.sum()), params_after=r * c["costs"]["per_rank_params"],
                       macs_after=r * c["costs"]["per_rank_macs"])
        else:
            row.update(rank=None, energy=1.0, params_after=row["params_before"], macs_after=row["macs_before"])
        rows.append(row)
    if not step["layers"]:
        raise SlimkitError("no layer got smaller: every rank chosen would cost as many parameters or MACs "
                           "as the layer itself, or save less than min_saving (lower rank/energy/budget)")
    meta = getattr(model, "slimkit_meta", None)
    if meta is not None:  # saved models carry the step, so they reload factorized
        model.slimkit_meta = {**meta, "plan": [*meta.get("plan", []), step]}
    return model, step, rows


@torch.no_grad()
def _factors(module: nn.Module, kind: str, u, s, vh, r: int) -> nn.Sequential:
    """The two layers replacing ``module`` at rank ``r``, holding the split SVD factors."""
    root = s[:r].sqrt()
    left, right = u[:, :r] * root, root[:, None] * vh[:r]  # W ~ left @ right
    first, second = (m.to(module.weight.dtype) for m in _empty_factors(module, kind, r))
    if kind == "linear":
        first.weight.copy_(right)
        second.weight.copy_(left)
    elif kind == "channel":
        first.weight.copy_(right.reshape(first.weight.shape))
        second.weight.copy_(left.reshape(second.weight.shape))
    else:
        out, cin, kh, kw = module.weight.shape
        first.weight.copy_(left.T.reshape(r, cin, kh, 1))  # rows (c, y) -> [r, c, y, 1]
        second.weight.copy_(right.reshape(r, out, kw).permute(1, 0, 2).reshape(out, r, 1, kw))
    if module.bias is not None:
        second.bias.copy_(module.bias)
    return Factorized(first, second)


def _empty_factors(module: nn.Module, kind: str, r: int) -> tuple[nn.Module, nn.Module]:
    bias = module.bias is not None
    if kind == "linear":
        return nn.Linear(module.in_features, r, bias=False), nn.Linear(r, module.out_features, bias=bias)
    out, cin, kh, kw = module.weight.shape
    if kind == "channel":
        first = nn.Conv2d(cin, r, (kh, kw), module.stride, module.padding, module.dilation, bias=False)
        return first, nn.Conv2d(r, out, 1, bias=bias)
    (sh, sw), (dh, dw), (ph, pw) = module.stride, module.dilation, module.padding
    first = nn.Conv2d(cin, r, (kh, 1), (sh, 1), (ph, 0), (dh, 1), bias=False)
    return first, nn.Conv2d(r, out, (1, kw), (1, sw), (0, pw), (1, dw), bias=bias)


class Factorized(nn.Sequential):
    """Two layers standing in for one; keeps the original's shape attributes, which model code reads
    (``self.q.out_features``)."""

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__(first, second)
        if isinstance(first, nn.Linear):
            self.in_features, self.out_features = first.in_features, second.out_features
        else:
            self.in_channels, self.out_channels = first.in_channels, second.out_channels


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@register_plan_op(FactorizeStep)
def replay_factorize(model: nn.Module, step: dict[str, Any]) -> nn.Module:
    """Rebuild the factorized structure on a fresh model (the weights come from the file)."""
    for name, spec in step["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise SlimkitError(f"factorization plan names a layer this model lacks: {name}") from None
        if _kind(module, spec["kind"]) != spec["kind"]:
            raise SlimkitError(f"factorization plan: {name} is not a layer of kind {spec['kind']}")
        full = min(_matrix_shape(module, spec["kind"]))
        if spec["rank"] > full:
            raise SlimkitError(f"factorization plan: rank {spec['rank']} of {name} exceeds its full rank {full}")
        _replace(model, name, Factorized(*_empty_factors(module, spec["kind"], int(spec["rank"]))))
    return model


def _matrix_shape(module: nn.Module, kind: str) -> tuple[int, int]:
    """The shape of the matrix whose SVD factorizes ``module`` (see ``_matrix``), without building it."""
    if kind == "linear":
        return module.out_features, module.in_features
    out, cin, kh, kw = module.weight.shape
    return (out, cin * kh * kw) if kind == "channel" else (cin * kh, out * kw)
