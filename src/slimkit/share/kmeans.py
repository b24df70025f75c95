"""One-dimensional clustering of a layer's weights: the centroids they will share.

Three of the initialisations compared by Han et al. (Deep Compression, section 3.1):
``linear`` spaces the centroids evenly over [min, max], ``density`` spaces them
evenly over the weights' CDF (dense where weights are), ``random`` picks k of the
weights (Forgy); each is then refined by Lloyd's iterations. ``optimal`` instead
solves the 1-D k-means problem exactly by dynamic programming over the sorted
weights (Wang and Song, 2011), with the divide-and-conquer speed-up that the
optimal split points' monotonicity allows: O(k n log n) cost evaluations.
"""

from __future__ import annotations

import numpy as np

INITS = ("linear", "density", "random", "optimal")


def cluster_1d(values: np.ndarray, k: int, init: str = "linear", iters: int = 100,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(centroids sorted ascending, label of each value)`` for at most ``k`` clusters."""
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    k = int(min(k, np.unique(x).size))
    if init == "optimal":
        return _optimal(x, k)
    centroids = _initial(np.sort(x), k, init, np.random.default_rng(seed))
    for _ in range(iters):
        labels = _nearest(x, centroids)
        used, labels = np.unique(labels, return_inverse=True)  # clusters left empty are dropped
        updated = np.bincount(labels, weights=x) / np.bincount(labels)  # sorted: clusters are intervals
        converged = np.array_equal(updated, centroids)
        centroids = updated
        if converged:
            break
    return centroids, labels  # each centroid is the mean of its members


def sse(values: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> float:
    """Sum of squared distances of the values to their centroids (the k-means objective)."""
    return float(((np.asarray(values, dtype=np.float64).reshape(-1) - centroids[labels]) ** 2).sum())


def _initial(x_sorted: np.ndarray, k: int, init: str, rng: np.random.Generator) -> np.ndarray:
    if init == "linear":
        return np.linspace(x_sorted[0], x_sorted[-1], k)
    if init == "density":
        return np.quantile(x_sorted, (np.arange(k) + 0.5) / k)
    return np.sort(rng.choice(np.unique(x_sorted), size=k, replace=False))


def _nearest(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted ``centroids`` for each value (ties go to the lower one)."""
    return np.searchsorted((centroids[1:] + centroids[:-1]) / 2, x, side="left")


def _optimal(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(x, kind="stable")
    s = x[order]
    n = len(s)
    s1 = np.concatenate([[0.0], np.cumsum(s)])
    s2 = np.concatenate([[0.0], np.cumsum(s * s)])

    def cost(first: np.ndarray, last: np.ndarray) -> np.ndarray:
        """SSE of the sorted run s[first..last] (inclusive), elementwise."""
        count = last - first + 1
        total = s1[last + 1] - s1[first]
        return np.maximum(s2[last + 1] - s2[first] - total * total / count, 0.0)

    ends = np.arange(n)
    best = cost(np.zeros(n, dtype=np.int64), ends)  # one cluster covering s[0..i]
    starts = np.zeros((k, n), dtype=np.int64)  # where the last cluster of the best split of s[0..i] starts
    for j in range(1, k):
        best, starts[j] = _next_layer(best, j, n, cost)
    labels_sorted = np.empty(n, dtype=np.int64)
    centroids = np.empty(k)
    last = n - 1
    for j in range(k - 1, -1, -1):
        first = starts[j, last] if j else 0
        labels_sorted[first : last + 1] = j
        centroids[j] = s[first : last + 1].mean()
        last = first - 1
    labels = np.empty(n, dtype=np.int64)
    labels[order] = labels_sorted
    return centroids, labels


def _next_layer(previous: np.ndarray, j: int, n: int, cost) -> tuple[np.ndarray, np.ndarray]:
    """Best SSE of s[0..i] in j+1 clusters, for every i >= j, from the j-cluster answers.

    The best start of the last cluster never decreases with i, so the rows are solved
    breadth-first by divide and conquer, every row of one recursion depth at once.
    """
    best = np.full(n, np.inf)
    start = np.zeros(n, dtype=np.int64)
    # pending intervals of end positions [lo, hi] whose optimal start lies in [opt_lo, opt_hi]
    lo, hi = np.array([j]), np.array([n - 1])
    opt_lo, opt_hi = np.array([j]), np.array([n - 1])
    while len(lo):
        mid = (lo + hi) // 2
        top = np.minimum(mid, opt_hi)
        sizes = top - opt_lo + 1
        owner = np.repeat(np.arange(len(mid)), sizes)
        offsets = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        candidate = opt_lo[owner] + offsets
        value = previous[candidate - 1] + cost(candidate, mid[owner])
        seg_start = np.cumsum(sizes) - sizes
        seg_min = np.minimum.reduceat(value, seg_start)
        choice = candidate[_first_true_per_segment(value == seg_min[owner], owner, len(mid))]
        best[mid], start[mid] = seg_min, choice
        left = lo <= mid - 1
        right = mid + 1 <= hi
        lo, hi, opt_lo, opt_hi = (np.concatenate([lo[left], mid[right] + 1]),
                                  np.concatenate([mid[left] - 1, hi[right]]),
                                  np.concatenate([opt_lo[left], choice[right]]),
                                  np.concatenate([choice[left], opt_hi[right]]))
    return best, start


def _first_true_per_segment(flags: np.ndarray, owner: np.ndarray, segments: int) -> np.ndarray:
    """Position of the first True of each segment (segments are contiguous and each has one)."""
    positions = np.flatnonzero(flags)
    first = np.full(segments, len(flags))
    np.minimum.at(first, owner[positions], positions)
    return first
