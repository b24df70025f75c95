"""Structured pruning: remove whole channels, neurons and heads, so the module itself gets smaller.

Analyze, then apply: :func:`plan_channels` scores each channel group of the
dependency graph and returns a plan step (plain JSON data: which channels each
group keeps and which tensor slices they map to); :func:`apply_plan` cuts the
tensors and updates the layers' size attributes. The same ``apply_plan``
replays the step when a pruned model is loaded from safetensors + plan.
"""

from __future__ import annotations

import copy
import warnings
from fnmatch import fnmatchcase
from typing import Annotated, Any, Iterable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ..errors import SlimkitError
from ..inputs import Inputs, call, signature
from ..limits import MAX_TENSOR_ELEMENTS
from ..plan import StepSchema, register_plan_op
from ..train.loop import Batch, LossFn
from .graph import Group, Member, channel_groups
from .importance import gradient_magnitudes

PLAN_OP = "prune-channels"
STRUCTURED_METHODS = ("l1", "l2", "bn-scale", "taylor", "random")

Count = Annotated[int, Field(ge=0, le=MAX_TENSOR_ELEMENTS)]
Role = Literal["out", "in", "in-grouped", "norm", "param"]


class PlannedGroup(BaseModel):
    """One channel group of a plan step: the channels it keeps, and the tensor slices each channel owns
    (members: ``[tensor, dim, rep, offset, role, groups]``; files from before ``groups`` have five fields)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    size: Annotated[int, Field(ge=1, le=MAX_TENSOR_ELEMENTS)]
    block: Annotated[int, Field(ge=1)]
    parts: Annotated[int, Field(ge=1)]
    keep: list[Count] = Field(min_length=1)
    members: list[tuple[str, Count, Count, Count, Role] | tuple[str, Count, Count, Count, Role, Count]] = Field(
        min_length=1)

    @model_validator(mode="after")
    def _kept_channels_exist(self) -> "PlannedGroup":
        if any(b <= a for a, b in zip(self.keep, self.keep[1:])) or self.keep[-1] >= self.size:
            raise ValueError(f"keep must list increasing channel indices below size {self.size}")
        return self


class PruneChannelsStep(StepSchema):
    op: Literal["prune-channels"] = PLAN_OP
    method: str
    ratio: float
    scope: Literal["layer", "global"] = "layer"
    groups: list[PlannedGroup]


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module_name), attr)


def _channel_rows(tensor: torch.Tensor, member: Member, channels: int) -> torch.Tensor:
    """``channels x k`` view of the slices of ``tensor`` that belong to each channel."""
    if member.role == "in-grouped":  # input channel q * per + j is column j of group q's rows
        g = member.groups
        w = tensor.detach().reshape(g, tensor.shape[0] // g, tensor.shape[1], -1)
        return w.transpose(1, 2).reshape(channels, -1)
    moved = tensor.detach().movedim(member.dim, 0)
    part = moved[member.offset : member.offset + channels * member.rep]
    return part.reshape(channels, -1)


def group_scores(model: nn.Module, group: Group, method: str, grads: dict[str, torch.Tensor] | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One score per channel: each member's per-channel magnitude, mean-normalized, summed over members."""
    if method == "random":
        return torch.rand(group.size, generator=generator)
    total = torch.zeros(group.size, dtype=torch.float64)
    used = 0
    for member in group.members:
        tensor = _tensor(model, member.tensor)
        if not tensor.is_floating_point() or member.tensor.endswith(("running_mean", "running_var", ".bias")):
            continue  # weights carry the importance signal; biases and statistics do not
        if method == "bn-scale" and not (member.role == "norm" and member.tensor.endswith(".weight")):
            continue
        rows = _channel_rows(tensor, member, group.size).double()
        if method == "taylor":
            if grads is None or member.tensor not in grads:
                continue
            rows = rows * _channel_rows(grads[member.tensor], member, group.size).double()
        score = rows.pow(2).sum(1) if method == "l2" else rows.abs().sum(1)
        total += score / score.mean().clamp_min(1e-12)
        used += 1
    if used == 0:
        raise SlimkitError(f"importance {method!r} has nothing to score in the group of {group.describe()}"
                           + (" (bn-scale needs a BatchNorm or LayerNorm in the group)" if method == "bn-scale" else ""))
    return total


def _not_selected(group: Group, include: list[str], exclude: list[str]) -> str | None:
    """Why configuration keeps ``group`` whole, or None to prune it.

    Excluding a layer keeps that layer's own output channels. Its inputs may still shrink (they are
    another layer's outputs); but channels it produces together with other layers (added in a residual
    connection, or multiplied) must be cut from all of them at once, so such a group is kept whole.
    """
    producers = sorted({m.tensor.rpartition(".")[0] for m in group.producers})
    excluded = [layer for layer in producers if any(fnmatchcase(layer, pattern) for pattern in exclude)]
    if excluded:
        others = [layer for layer in producers if layer not in excluded]
        if not others:
            return f"excluded: {', '.join(excluded)} keeps its output channels"
        return (f"coupled with excluded {', '.join(excluded)}: {', '.join(others)} "
                f"{'produce' if len(others) > 1 else 'produces'} the same channels (added or multiplied together), "
                "so they are kept too")
    if not any(fnmatchcase(layer, pattern) for layer in producers for pattern in include):
        return f"not included: no pattern of include matches {', '.join(producers)}"
    return None


def plan_channels(
    model: nn.Module,
    example: Inputs,
    ratio: float,
    method: str = "l1",
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    batches: Iterable[Batch] | None = None,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    scope: str = "layer",
    max_ratio: float = 0.9,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Choose the channels to keep in every prunable group; returns (plan step, report notes).

    ``scope="layer"`` removes ``ratio`` of every group's channels; ``"global"`` removes ``ratio`` of all
    channels, the least important first across groups (scores compared relative to each group's mean), at
    most ``max_ratio`` of any one group and never its last block."""
    if scope not in ("layer", "global"):
        raise SlimkitError(f"structured pruning scope must be layer or global, got {scope!r}")
    if not 0 < max_ratio < 1:
        raise SlimkitError(f"max_ratio must be in (0, 1), got {max_ratio}")
    if method not in STRUCTURED_METHODS:
        raise SlimkitError(f"unknown importance {method!r}; choose one of {', '.join(STRUCTURED_METHODS)}")
    if not 0 <= ratio < 1:
        raise SlimkitError(f"structured pruning ratio must be in [0, 1), got {ratio}")
    groups, pinned = channel_groups(model, example)
    unsupported = {layers: reasons for layers, reasons in pinned.items() if reasons != ["reaches the model output"]}
    if unsupported:
        warnings.warn("structured pruning leaves these channels unpruned: " + "; ".join(
            f"{layers} ({', '.join(reasons)})" for layers, reasons in unsupported.items()), stacklevel=3)
    grads = None
    if method == "taylor":
        if batches is None:
            raise SlimkitError("taylor importance needs a few batches of training data")
        grads = gradient_magnitudes(model, batches, loss_fn or nn.CrossEntropyLoss())
    generator = torch.Generator().manual_seed(seed)
    skipped, selected, block_scores = {}, [], []
    for group in groups:
        reason = _not_selected(group, include or ["*"], exclude or [])
        if reason is not None:
            skipped[group.describe()] = reason
            continue
        selected.append(group)
        per_part = group.size // group.block // group.parts  # blocks in each part
        scores = group_scores(model, group, method, grads, generator)
        block_scores.append(scores.reshape(group.parts, per_part, group.block).sum(2))
    if scope == "global":
        removals = _global_removals(block_scores, [g.block * g.parts for g in selected], ratio, max_ratio)
    else:
        removals = [min(int(ratio * scores.shape[1]), scores.shape[1] - 1) for scores in block_scores]
    planned = []
    for group, scores, remove in zip(selected, block_scores, removals):
        per_part = scores.shape[1]
        kept = torch.sort(torch.argsort(scores, dim=1, descending=True, stable=True)[:, : per_part - remove]).values
        kept_blocks = (kept + per_part * torch.arange(group.parts)[:, None]).reshape(-1)
        keep = (kept_blocks[:, None] * group.block + torch.arange(group.block)[None, :]).reshape(-1)
        planned.append({
            "size": group.size, "block": group.block, "parts": group.parts, "keep": keep.tolist(),
            "members": [[m.tensor, m.dim, m.rep, m.offset, m.role, m.groups] for m in group.members],
        })
    step = {"op": PLAN_OP, "method": method, "ratio": ratio, "groups": planned}
    if scope == "global":
        step["scope"] = "global"
    notes = {"groups": [{"channels": g.describe(), "kept": len(p["keep"])} for g, p in zip(selected, planned)],
             "skipped": skipped, "pinned": pinned}
    return step, notes


@register_plan_op(PruneChannelsStep)
def apply_plan(model: nn.Module, step: dict[str, Any]) -> nn.Module:
    """Cut every member tensor down to its kept channels and resize the layers' attributes."""
    removed: dict[tuple[str, int], set[int]] = {}
    originals: dict[tuple[str, int], int] = {}
    touched = set()
    for group in step["groups"]:
        for tensor, dim, rep, offset, role, *rest in group["members"]:
            _check_member_fits(_tensor(model, tensor), tensor, dim, rep, offset, role, group["size"], *rest[:1] or [1])
        kept = set(group["keep"])
        dropped = [c for c in range(group["size"]) if c not in kept]
        for tensor, dim, rep, offset, role, *rest in group["members"]:
            if role == "in-grouped":  # before any row is removed: the rows still say which group they are in
                _replace(model, tensor, _grouped_columns(_tensor(model, tensor), group["keep"], rest[0]))
                touched.add(tensor.rpartition(".")[0])
                continue
            key = (tensor, dim)
            originals[key] = _tensor(model, tensor).shape[dim]
            removed.setdefault(key, set()).update(offset + c * rep + j for c in dropped for j in range(rep))
    for (tensor, dim), drop in removed.items():
        current = _tensor(model, tensor)
        keep = torch.tensor([i for i in range(originals[(tensor, dim)]) if i not in drop], dtype=torch.long)
        _replace(model, tensor, current.detach().index_select(dim, keep).clone())
        touched.add(tensor.rpartition(".")[0])
    for name in touched | {name.rpartition(".")[0] for name in touched}:  # parents too: attentions store widths
        _resync(model.get_submodule(name))
    return model


def _check_member_fits(value: torch.Tensor, name: str, dim: int, rep: int, offset: int, role: str, size: int,
                       groups: int) -> None:
    """A step read from a file may name any sizes: they must lie within the tensor they cut."""
    if role == "in-grouped":
        if value.dim() < 2 or not 1 <= groups <= value.shape[0] or value.shape[0] % groups or \
                value.shape[1] * groups != size:
            raise SlimkitError(f"{name} of shape {tuple(value.shape)} is not a convolution of {groups} groups "
                               f"reading {size} channels")
        return
    if dim >= value.dim():
        raise SlimkitError(f"{name} has {value.dim()} dimensions, the plan cuts dimension {dim}")
    if offset + size * rep > value.shape[dim]:
        raise SlimkitError(f"{name} has {value.shape[dim]} entries along dimension {dim}, the plan cuts up to "
                           f"{offset + size * rep}")


def _grouped_columns(weight: torch.Tensor, keep: list[int], groups: int) -> torch.Tensor:
    """A grouped convolution's weight with only the kept input channels of each group."""
    per = weight.shape[1]
    rows = weight.shape[0] // groups
    parts = []
    for q in range(groups):
        cols = torch.tensor([c - q * per for c in keep if q * per <= c < (q + 1) * per], dtype=torch.long)
        parts.append(weight[q * rows : (q + 1) * rows].detach().index_select(1, cols))
    return torch.cat(parts).clone()


def _replace(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, attr)
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        module._buffers[attr] = value


def _resync(module: nn.Module) -> None:
    """Make a layer's size attributes agree with its (pruned) tensors."""
    if isinstance(module, nn.modules.conv._ConvNd):
        out_channels = module.weight.shape[0]
        if module.groups > 1 and module.groups == module.in_channels == module.out_channels:  # depthwise
            module.groups = module.in_channels = out_channels
        else:
            module.in_channels = module.weight.shape[1] * module.groups
        module.out_channels = out_channels
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        source = module.weight if module.weight is not None else module.running_mean
        module.num_features = source.shape[0]
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = (module.weight.shape[0],)
    elif isinstance(module, nn.MultiheadAttention):  # heads keep their count and become narrower
        module.embed_dim = module.kdim = module.vdim = module.in_proj_weight.shape[1]
        module.head_dim = module.embed_dim // module.num_heads
    elif type(module).__name__ == "RelativePositionalMultiHeadAttention":  # MaxViT reshapes with head_dim
        module.head_dim = module.to_qkv.weight.shape[0] // 3 // module.n_heads
    elif type(module).__name__ == "VisionTransformer" and hasattr(module, "conv_proj"):
        module.hidden_dim = module.conv_proj.weight.shape[0]  # torchvision's ViT reshapes patches with it


def _global_removals(block_scores: list[torch.Tensor], widths: list[int], ratio: float, max_ratio: float) -> list[int]:
    """Blocks to remove from each part of each group so that ``ratio`` of all channels go, least important first
    across groups. A block index is removed from every part of its group at once, ranked by its mean over the
    parts; scores are compared relative to their group's mean, since groups score on different scales."""
    candidates = []
    for g, scores in enumerate(block_scores):
        per_block = scores.mean(0)
        relative = (per_block / per_block.mean().clamp_min(1e-12)).tolist()
        candidates += [(value, g) for value in sorted(relative)]
    caps = [min(int(max_ratio * scores.shape[1]), scores.shape[1] - 1) for scores in block_scores]
    target = ratio * sum(width * scores.shape[1] for width, scores in zip(widths, block_scores))
    counts, removed = [0] * len(block_scores), 0
    for _, g in sorted(candidates, key=lambda c: c[0]):  # (each group's own values arrive in ascending order)
        if removed >= target:
            break
        if counts[g] < caps[g]:
            counts[g] += 1
            removed += widths[g]
    return counts


def prune_channels(
    model: nn.Module,
    example: Inputs,
    ratio: float,
    method: str = "l1",
    **kw: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Plan, apply and verify: returns the physically smaller model and report notes.

    If the pruned model cannot run (a layer whose code hard-codes a width the
    graph could not see), the groups are applied one by one and each one that
    breaks the forward pass is skipped with a warning: never a broken model.
    """
    step, notes = plan_channels(model, example, ratio, method, **kw)
    with torch.no_grad():
        expected = tuple(call(model.eval(), example[:2]).shape)
    candidate = apply_plan(copy.deepcopy(model), step)
    failure = _forward_error(candidate, example, expected)
    if failure is not None:
        kept_groups, candidate = [], model
        for group in step["groups"]:
            trial = apply_plan(copy.deepcopy(candidate), {**step, "groups": [group]})
            error = _forward_error(trial, example, expected)
            if error is None:
                kept_groups.append(group)
                candidate = trial
            else:
                tensors = sorted({m[0].rpartition(".")[0] for m in group["members"]})
                warnings.warn(f"structured pruning skipped the group of {', '.join(tensors)}: {error}", stacklevel=2)
                notes["skipped"][", ".join(tensors)] = error
        step = {**step, "groups": kept_groups}
        candidate = apply_plan(copy.deepcopy(model), step)
    meta = getattr(candidate, "slimkit_meta", None)
    if meta is not None:
        candidate.slimkit_meta = {**meta, "plan": [*meta.get("plan", []), step]}
    notes["reached"] = _reached(model, candidate, example, ratio, kw.get("scope", "layer"))
    return candidate, notes


def _reached(model: nn.Module, pruned: nn.Module, example: Inputs, ratio: float, scope: str) -> dict[str, Any]:
    """What was asked and what it came to: parameters and MACs before and after."""
    from ..analyze import count_macs

    shape = signature(example)
    params = [sum(p.numel() for p in m.parameters()) for m in (model, pruned)]
    macs = [count_macs(m, shape)[0] for m in (model, pruned)]
    return {"requested_ratio": ratio, "scope": scope, "params": params, "macs": macs,
            "params_kept": params[1] / max(1, params[0]), "macs_kept": macs[1] / max(1, macs[0])}


def _forward_error(model: nn.Module, example: Inputs, expected: tuple[int, ...]) -> str | None:
    try:
        with torch.no_grad():
            shape = tuple(call(model.eval(), example[:2]).shape)
    except Exception as exc:  # any failure of the pruned forward pass means the group is unsafe
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None if shape == expected else f"output shape changed from {expected} to {shape}"
