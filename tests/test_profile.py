import os

import torch

from slimkit import load, profile
from slimkit.analyze import measure_latency, time_call, torch_threads


def test_profile_numbers(trained_run, digits):
    from slimkit import evaluate, make_loader

    model = load(trained_run)
    result = profile(model, (1, 8, 8), model_path=trained_run / "model",
                     score_fn=lambda m: evaluate(m, make_loader(digits, "test"))["accuracy"], threads=1)
    assert result["params"] == 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert result["nonzero_params"] == result["params"]
    assert result["macs"] == 64 * 300 + 300 * 100 + 100 * 10
    assert result["dense_fp32_bytes"] == 4 * result["params"]
    files = (trained_run / "model").iterdir()
    assert result["file_bytes"] == sum(os.path.getsize(f) for f in files)
    assert result["accuracy"] > 0.9
    assert set(result["latency_ms"]) == {"torch_b1", "torch_b64", "ort_b1", "ort_b64"}
    assert all(v > 0 for v in result["latency_ms"].values())
    assert result["threads"] == 1
    assert "estimated" not in result["provenance"]["file_bytes"]
    assert "computed" in result["provenance"]["dense_fp32_bytes"]


def test_latency_restores_thread_count():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    measure_latency(torch.nn.Linear(8, 2), (8,), threads=1)
    assert torch.get_num_threads() == before


def test_time_call_takes_the_median_over_repeats():
    calls = []
    timing = time_call(lambda: calls.append(1), warmup=2, min_repeats=7, max_repeats=7, budget_s=0)
    assert len(calls) == 9 and timing.repeats == 7
    assert timing.p25_ms <= timing.median_ms <= timing.p75_ms
