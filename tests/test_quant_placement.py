"""Float or int8 per layer by measured ONNX Runtime time (quant/placement.py)."""

import torch
from torch import fx, nn

from slimkit import parse_recipe, run_recipe
from slimkit.quant import placement
from slimkit.quant.placement import LatencyPlacement, choose_float_layers, layer_times
from slimkit.quant.ptq import StaticQuantConfig, quantize_static


class Block(nn.Module):
    """The patterns whose kernels ONNX Runtime renames: conv + in-place ReLU, conv + ReLU6, a residual add,
    linear + ReLU, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.expand = nn.Conv2d(16, 16, 3, padding=1)
        self.project = nn.Conv2d(16, 16, 1)
        self.hidden, self.head = nn.Linear(16, 16), nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu_(self.stem(x))
        y = self.project(nn.functional.relu6(self.expand(x)))
        return self.head(torch.relu(self.hidden((x + y).mean((2, 3)))))


def test_every_layer_gets_its_int8_and_float_kernel_time():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 16, 16)
    quantized, _ = quantize_static(Block().eval(), x, StaticQuantConfig())
    rows = {r["layer"]: r for r in layer_times(quantized, x[:2], threads=1, runs=3)}
    assert set(rows) == {"stem", "expand", "project", "hidden", "head"}
    for layer, row in rows.items():
        assert row["int8_ms"] > 0 and row["float_ms"] > 0, layer
        integer = "QGemm" if layer in ("hidden", "head") else "QLinearConv"
        assert integer in row["int8_ops"] and not {"Conv", "FusedConv", "Gemm", "FusedGemm"} & set(row["int8_ops"])
        assert {"Conv", "FusedConv", "Gemm", "FusedGemm"} & set(row["float_ops"]), row
        assert not any(op.startswith("QLinear") for op in row["float_ops"]), row


def _float_layers(gm: fx.GraphModule) -> set[str]:
    """Layers whose weight reaches its op without a quantizer."""
    return {owner for name, owner in placement.weighted_layers(gm).items()
            if next(n for n in gm.graph.nodes if n.name == name).args[1].op == "get_attr"}


def test_candidates_are_kept_in_float_only_where_the_whole_model_gets_faster(monkeypatch):
    """stem and expand run slower as int8 kernels; the model (a stand-in clock) is faster with stem in float,
    slower with expand in float (its boundaries cost more than its kernel saves)."""
    kernel = {"stem": (2.0, 1.0), "expand": (1.5, 1.0), "project": (0.5, 1.0), "hidden": (0.1, 0.2),
              "head": (0.1, 0.2)}
    monkeypatch.setattr(placement, "layer_times", lambda q, x, threads, runs: [
        {"layer": layer, "int8_ms": i8, "float_ms": f32, "int8_ops": [], "float_ops": []}
        for layer, (i8, f32) in kernel.items()])
    cost = {"stem": -2.0, "expand": 3.0}
    clocks = []

    def timer(quantized, x, threads, path):
        ms = 10 + sum(cost[layer] for layer in _float_layers(quantized))
        clocks.append(sorted(_float_layers(quantized)))
        return lambda: ms

    monkeypatch.setattr(placement, "_timer", timer)
    x = torch.randn(8, 3, 16, 16)
    result = choose_float_layers(Block().eval(), x, StaticQuantConfig(), LatencyPlacement(rounds=1))
    assert result["exclude"] == ["stem"]
    # all int8, both candidates together (11 ms: rejected), stem alone (8 ms: kept), stem + expand (rejected)
    assert clocks == [[], ["expand", "stem"], ["stem"], ["expand", "stem"]]
    assert [t["kept"] for t in result["trials"]] == [False, True, False]
    assert [round(t["ratio"], 3) for t in result["trials"]] == [1.1, 0.8, round(11 / 8, 3)]


def test_quantize_stage_keeps_the_chosen_layers_in_float(trained_run, tmp_path, monkeypatch):
    chosen = {"exclude": ["fc2"], "threads": 1, "batch": 4,
              "layers": [{"layer": "fc2", "int8_ms": 0.2, "float_ms": 0.1}],
              "trials": [{"float": ["fc2"], "best_ms": 1.0, "trial_ms": 0.9, "ratio": 0.9, "kept": True}]}
    asked = []

    def choose(model, calib, cfg, settings):
        asked.append(settings)
        return chosen

    monkeypatch.setattr("slimkit.quant.stage.choose_float_layers", choose)
    recipe = parse_recipe({"model": {"path": str(trained_run)}, "evaluate": {"latency": False},
                           "stages": [{"type": "quantize", "calib": 64,
                                       "latency_placement": {"threads": 1, "batch": 4}}]})
    report = run_recipe(recipe, tmp_path, progress=False)
    assert asked == [LatencyPlacement(threads=1, batch=4)]
    step = report["stages"][1]["notes"]
    assert step["latency_placement"] == chosen
    assert step["quantize"]["weights_int8"] == 2  # lenet300's fc1 and fc3; fc2 stays float
    html = (tmp_path / "report.html").read_text()
    assert "Float or int8 by measured latency" in html and "1 layers kept in float" in html
