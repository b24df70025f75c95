"""Sensitivity analysis: validation score of the model with one layer (or channel group) pruned at a time.

The sweep tells which layers tolerate pruning; :func:`allocate_sparsity` turns
it into per-layer sparsities that reach an overall target while keeping the
worst predicted score drop as small as possible. Scores use the validation
split, never the test split the final accuracy is reported on.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

from torch import nn

from ..errors import SlimkitError
from ..select import select_layers
from ..task import Task
from .mask import remove_masks
from .structured import apply_plan, plan_channels
from .unstructured import PruneConfig, prune_weights

DEFAULT_SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def sensitivity(
    model: nn.Module,
    task: Task,
    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES,
    method: str = "l1",
    structured: bool = False,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    progress: Callable[[str], None] = lambda name: None,
) -> dict[str, Any]:
    """``{"baseline": score, "sparsities": [...], "layers": {name: {"params": n, "scores": [...]}}}``."""
    if not sparsities or any(not 0 < s < 1 for s in sparsities):
        raise SlimkitError(f"sensitivity sparsities must lie in (0, 1), got {list(sparsities)}")
    sparsities = tuple(sorted(sparsities))
    model = model.eval()
    out: dict[str, Any] = {"baseline": task.val_score(model), "sparsities": list(sparsities), "method": method,
                           "structured": structured, "metric": task.metric, "layers": {}}
    if structured:
        for name, params, pruned_at in _group_sweeps(model, task, sparsities, method, include, exclude):
            progress(name)
            out["layers"][name] = {"params": params, "scores": [task.val_score(pruned_at(s)) for s in sparsities]}
        return out
    for name, module in select_layers(model, include or ["*"], exclude or []):
        progress(name)
        scores = []
        for s in sparsities:
            trial = copy.deepcopy(model)
            prune_weights(trial, PruneConfig(method=method, sparsity=s, include=[name]), task)
            scores.append(task.val_score(remove_masks(trial)))
        out["layers"][name] = {"params": module.weight.numel(), "scores": scores}
    return out


def _group_sweeps(model, task, sparsities, method, include, exclude):
    example = task.example_inputs[:8]
    plans = {s: plan_channels(model, example, s, method, include=include, exclude=exclude, seed=0)[0]
             for s in sparsities}
    for index, group in enumerate(plans[sparsities[0]]["groups"]):
        producers = sorted({m[0].rpartition(".")[0] for m in group["members"] if m[4] == "out"})
        name = ", ".join(producers[:3]) + (" ..." if len(producers) > 3 else "")
        params = sum(model.get_parameter(m[0]).numel() for m in group["members"]
                     if m[0] in dict(model.named_parameters()))

        def pruned_at(s, index=index):
            step = {**plans[s], "groups": [plans[s]["groups"][index]]}
            return apply_plan(copy.deepcopy(model), step)

        yield name, params, pruned_at


def allocate_sparsity(sens: dict[str, Any], target: float) -> dict[str, float]:
    """Per-layer sparsities whose parameter-weighted mean is ``target``, minimizing the worst predicted drop."""
    if sens.get("structured"):
        raise SlimkitError("sparsity allocation applies to unstructured sensitivity results")
    if not 0 <= target < 1:
        raise SlimkitError(f"target sparsity must be in [0, 1), got {target}")
    grid = [0.0] + list(sens["sparsities"])
    layers = sens["layers"]
    total = sum(info["params"] for info in layers.values())
    # monotone envelope: the drop at s is the worst drop seen at any sparsity up to s
    envelopes = {}
    for name, info in layers.items():
        drops, worst = [0.0], 0.0
        for score in info["scores"]:
            worst = max(worst, sens["baseline"] - score)
            drops.append(worst)
        envelopes[name] = drops

    def allowed(tolerance: float) -> dict[str, float]:
        return {name: max(s for s, d in zip(grid, drops) if d <= tolerance) for name, drops in envelopes.items()}

    def overall(chosen: dict[str, float]) -> float:
        return sum(chosen[n] * layers[n]["params"] for n in layers) / total

    candidates = sorted({d for drops in envelopes.values() for d in drops})
    chosen = allowed(candidates[-1])
    for tolerance in candidates:
        chosen = allowed(tolerance)
        if overall(chosen) >= target:
            break
    reached = overall(chosen)
    if reached < target:
        raise SlimkitError(f"the sweep's largest sparsities reach only {reached:.3f} overall, below {target}")
    scale = target / reached if reached else 0.0
    return {name: round(s * scale, 6) for name, s in chosen.items()}

