"""The lowest singular energy that keeps a model's measured score: ranks chosen by fidelity, not by a guess.

Retained energy is a poor proxy for accuracy (a trained transformer keeps cosine 0.70 at 90% energy), so
``min_score`` bisects the energy shared by all selected layers on the task's validation score, before any
fine-tuning: the result is the most compressed factorization found that scores at least ``min_score``.
Higher energy never compresses more, so an energy at which no layer gets smaller ends the search upwards.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

from torch import nn

from ..errors import SlimkitError
from .svd import FactorizeConfig, factorize

LOWEST_ENERGY = 0.5
STEPS = 7  # bisection steps: the energy to within (1 - LOWEST_ENERGY) / 2^7 = 0.004


def factorize_for_score(model: nn.Module, example, cfg: FactorizeConfig, score_fn: Callable[[nn.Module], float],
                        min_score: float) -> tuple[nn.Module, dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """``factorize`` at the lowest energy whose model scores at least ``min_score``, and the search: that energy,
    its score, and every energy tried with its score (None where no layer got smaller)."""
    low, high, best, tried = LOWEST_ENERGY, 1.0, None, []
    for _ in range(STEPS):
        energy = (low + high) / 2
        try:
            made = factorize(copy.deepcopy(model), example, cfg.model_copy(update={"energy": energy, "min_score": None}))
        except SlimkitError:  # nothing gets smaller here, nor at any higher energy
            tried.append({"energy": energy, "score": None})
            high = energy
            continue
        score = float(score_fn(made[0]))
        tried.append({"energy": energy, "score": score})
        if score >= min_score:
            best, high = (*made, {"energy": energy, "score": score}), energy
        else:
            low = energy
    if best is None:
        shown = ", ".join(f"{t['energy']:.3f}: {'no layer smaller' if t['score'] is None else round(t['score'], 4)}"
                          for t in tried)
        raise SlimkitError(f"no factorization keeps the validation score >= {min_score} while making a layer smaller "
                           f"(energy tried: {shown}); lower min_score, or recover with finetune/distillation from a "
                           "fixed energy instead")
    return (*best[:3], {**best[3], "tried": tried})
