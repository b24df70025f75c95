"""Float or int8, layer by layer, chosen by measured ONNX Runtime time.

int8 is not faster everywhere: a small or depthwise convolution can take as long in ONNX Runtime's integer
kernel as in its float one, and a layer left in float inside an int8 region pays for a dequantize before it
and a quantize after it. So nothing here is predicted from shapes. The quantized graph is exported twice with
the exporter's node names kept (``node_<graph node>``, which ONNX Runtime's profiler reports, fused nodes
included): as int8 QDQ, and with every quantizer removed (the same folded float graph). Both are profiled at
the deployment batch and thread count, and each weighted layer's int8 kernel time is set against its float
kernel time. Layers whose int8 kernel is slower become candidates to keep in float; the model quantized with
them excluded is then timed end to end against the all-int8 model (interleaved rounds, medians), and kept
only if it is faster: the boundaries it adds are in that measurement.
"""

from __future__ import annotations

import json
import re
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import fx, nn

from ..config import Config
from ..inputs import Inputs, rows_of
from .ptq import WEIGHTED, StaticQuantConfig, quantize_static


PLACEMENT_CALIBRATION = 8  # samples calibrating the models that are only timed


class LatencyPlacement(Config):
    """Where and how int8 and float are timed against each other."""

    threads: int = Field(2, ge=1, le=256)  # ONNX Runtime intra-op threads, as deployed
    batch: int = Field(1, ge=1, le=1024)  # as deployed
    margin: float = Field(0.1, ge=0, le=10)  # a layer's int8 kernel must be this much slower to be a candidate
    runs: int = Field(20, ge=3, le=1000)  # profiled runs per file (the median of each node's times)
    rounds: int = Field(5, ge=1, le=50)  # interleaved end-to-end rounds judging each candidate
    max_trials: int = Field(8, ge=0, le=1000)  # candidates judged end to end (largest per-layer saving first)
    min_gain: float = Field(0.02, ge=0, lt=1)  # a candidate is kept if the model gets this much faster


def weighted_layers(gm: fx.GraphModule) -> dict[str, str]:
    """``{graph node name: layer (module path)}`` for every conv and linear in a quantized graph."""
    from ..export.layer_diff import weight_owner

    layers = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in WEIGHTED:
            owner = weight_owner(node)
            if owner is not None:
                layers[node.name] = owner
    return layers


def _fx_name(node) -> str | None:
    """The graph node an ONNX node was exported from, from the exporter's per-node provenance (its generated
    names, ``node_Conv_526``, do not say)."""
    origin = next((m.value for m in node.metadata_props if m.key == "pkg.torch.onnx.fx_node"), "")
    match = re.match(r"%(\S+) :", origin)
    return match.group(1) if match else None


def _node_key(profiled: str) -> str:
    """The ONNX node an ONNX Runtime profiler entry belongs to: the optimizer's fusions and layout changes
    append ``_token_7`` or ``_nchwc`` to the name of the node they replace, or prefix ``fused``."""
    name = profiled.removesuffix("_kernel_time").removeprefix("fused ")  # Gemm + ReLU: "fused node_linear"
    while True:
        shorter = re.sub(r"(_token_\d+|_nchwc)$", "", name)
        if shorter == name:
            return name.removeprefix("node_")
        name = shorter


def profile_nodes(path: Path, x: Inputs, threads: int, runs: int) -> dict[str, tuple[str, float]]:
    """``{ONNX node: (ONNX Runtime op, median ms per run)}`` from ONNX Runtime's profiler."""
    from ..export.onnx import ort_feed, ort_session, ort_session_options

    opts = ort_session_options(threads)
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.with_suffix(""))
    session = ort_session(path, threads, opts)
    feed = ort_feed(session, x)
    warmup = 3
    for _ in range(warmup + runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    times: dict[str, list[float]] = {}
    ops: dict[str, str] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            key = _node_key(event["name"])
            times.setdefault(key, []).append(event["dur"] / 1e3)
            ops[key] = event["args"].get("op_name", "")
    return {key: (ops[key], statistics.median(samples[-runs:])) for key, samples in times.items()}


def _per_layer(path: Path, layers: dict[str, str], x: Inputs, threads: int, runs: int) -> dict[str, list]:
    """``{graph node of a weighted layer: [ONNX Runtime ops, ms per run]}``. A fused kernel is named after the
    node it absorbed last (conv + ReLU: the ReLU), or after its output value, so each profiled kernel is traced
    back through the file's own graph, at most three producers up, to the conv or linear it belongs to (conv
    and linear nodes keep their graph names through the exporter's re-capture; in-place ops do not)."""
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    by_name = {node.name.removeprefix("node_"): node for node in nodes}
    producer = {out: node for node in nodes for out in node.output}
    origin = {id(node): _fx_name(node) for node in nodes}

    def owner(key: str) -> str | None:
        start = by_name.get(key) or producer.get(key)
        frontier = [start] if start is not None else []
        for _ in range(4):
            for node in frontier:
                if origin[id(node)] in layers:
                    return origin[id(node)]
            frontier = [producer[name] for node in frontier for name in node.input if name in producer]
        return None

    result: dict[str, list] = {}
    for key, (op, ms) in profile_nodes(path, x, threads, runs).items():
        layer = owner(key)
        if layer is not None:
            ops, total = result.get(layer, [[], 0.0])
            result[layer] = [[*ops, op], total + ms]
    return result


def _two(x: Inputs) -> torch.Tensor:
    """Two samples to export with: a batch of one makes the exporter fix the batch size at 1."""
    return rows_of(x, 2)


def layer_times(quantized: fx.GraphModule, x: Inputs, threads: int, runs: int) -> list[dict[str, Any]]:
    """Each weighted layer's kernel time in ONNX Runtime as int8 (the QDQ file) and as float (the same graph
    without its quantizers), in ms per run at ``x``'s batch."""
    from ..export.onnx import DEFAULT_OPSET, _export_graph
    from ..export.qdq import write_qdq, without_quantizers
    from .ops import QUANTIZERS

    reference = without_quantizers(quantized, QUANTIZERS)
    with tempfile.TemporaryDirectory() as tmp:
        int8_path, float_path = Path(tmp) / "int8.onnx", Path(tmp) / "float.onnx"
        write_qdq(quantized, int8_path, _two(x), keep_names=True)
        _export_graph(reference, float_path, _two(x), DEFAULT_OPSET, strip=False)
        layers = weighted_layers(quantized)  # the float graph's conv and linear nodes keep these names
        int8 = _per_layer(int8_path, layers, x, threads, runs)
        fp32 = _per_layer(float_path, layers, x, threads, runs)
    rows = []
    for node, layer in layers.items():
        if node in int8 and node in fp32:
            rows.append({"layer": layer, "int8_ops": int8[node][0], "int8_ms": int8[node][1],
                         "float_ops": fp32[node][0], "float_ms": fp32[node][1]})
        else:  # no kernel carries its name: not attributed, so left as it is
            rows.append({"layer": layer, "int8_ms": None, "float_ms": None})
    return rows


def _timer(quantized: nn.Module, x: Inputs, threads: int, path: Path):
    """A function measuring ``quantized``'s int8 file end to end in ONNX Runtime (median ms)."""
    from ..analyze.latency import ort_latency
    from ..export.onnx import ort_session
    from ..export.qdq import write_qdq

    write_qdq(quantized, path, _two(x))
    session = ort_session(path, threads)
    return lambda: ort_latency(session, x).median_ms


def _speedup(best, trial, rounds: int) -> tuple[float, float, list[float]]:
    """(best ms, trial ms, the per-round ratios trial / best): the two timed back to back in each round, so a
    machine that slows down for a while slows both."""
    pairs = [(best(), trial()) for _ in range(rounds)]
    return (statistics.median(b for b, _ in pairs), statistics.median(t for _, t in pairs), [t / b for b, t in pairs])


def choose_float_layers(model: nn.Module, calib: Inputs, cfg: StaticQuantConfig,
                        placement: LatencyPlacement) -> dict[str, Any]:
    """The layers to keep in float because ONNX Runtime runs the model faster so: ``{"exclude": [...],
    "layers": per-layer kernel times, "trials": [...]}``. Candidates are tried one at a time, largest
    per-layer saving first (after all of them at once); each is kept only if the whole model, measured
    interleaved with the best so far, gets faster in every round and by more than ``min_gain`` in the
    median round (five rounds all faster by chance: 1 in 32). Timing does not depend on the scales, so the trial models
    are calibrated on a few samples only."""
    x = rows_of(calib, placement.batch)
    few = calib[:PLACEMENT_CALIBRATION]
    quantized, _ = quantize_static(model, few, cfg)
    rows = layer_times(quantized, x, placement.threads, placement.runs)
    slower = [r for r in rows if r["int8_ms"] is not None and r["int8_ms"] > r["float_ms"] * (1 + placement.margin)]
    candidates = [r["layer"] for r in sorted(slower, key=lambda r: r["float_ms"] - r["int8_ms"])]
    result: dict[str, Any] = {"layers": rows, "exclude": [], "trials": [], "threads": placement.threads,
                              "batch": placement.batch}
    trials = [candidates] if len(candidates) > 1 else []  # together: adjacent float layers share boundaries
    trials += [[layer] for layer in candidates[: placement.max_trials]]
    with tempfile.TemporaryDirectory() as tmp:
        best = _timer(quantized, x, placement.threads, Path(tmp) / "best.onnx")
        for i, layers in enumerate(trials):
            exclude = [*result["exclude"], *(layer for layer in layers if layer not in result["exclude"])]
            if exclude == result["exclude"]:
                continue
            trial_model, _ = quantize_static(model, few, cfg.model_copy(update={"exclude": [*cfg.exclude, *exclude]}))
            trial = _timer(trial_model, x, placement.threads, Path(tmp) / f"trial-{i}.onnx")
            best_ms, trial_ms, ratios = _speedup(best, trial, placement.rounds)
            ratio = statistics.median(ratios)
            kept = ratio < 1 - placement.min_gain and max(ratios) < 1  # faster in every round, not by chance
            result["trials"].append({"float": exclude, "best_ms": best_ms, "trial_ms": trial_ms, "ratio": ratio,
                                     "worst_ratio": max(ratios), "kept": kept})
            if kept:
                result["exclude"], best = exclude, trial
    return result
