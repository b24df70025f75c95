"""A single self-contained HTML report rendered from ``report.json`` (plots embedded as PNG data URIs)."""

from __future__ import annotations

import base64
import html
import os
from typing import Any

from ..io import human_bytes, write_text_atomic
from . import plots

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1f2933;padding:0 1rem}
h1{margin-bottom:.2rem}.sub{color:#616e7c;margin-top:0}
table{border-collapse:collapse;margin:1rem 0;font-size:.92rem}
th,td{border-bottom:1px solid #e4e7eb;padding:.35rem .8rem;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f5f7fa}
.good{color:#199473;font-weight:600}.bad{color:#cf1124;font-weight:600}
.note{color:#616e7c;font-size:.85rem}img{max-width:100%;border:1px solid #e4e7eb;margin:.5rem 0}
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _score(x: float, metric: str) -> str:
    return f"{100 * x:.2f}%" if metric == "accuracy" else f"{x:.4g}"


def _score_delta(delta: float, metric: str) -> str:
    text = f"{100 * delta:+.2f} pts" if metric == "accuracy" else f"{delta:+.4g}"
    return f'<span class="{"bad" if delta < 0 else "good"}">{text}</span>'


def _ratio(x: float | None, noise: float = 0.0) -> str:
    """A ratio where above 1 is better; changes within ``noise`` (e.g. timing jitter) are not coloured."""
    if x is None:
        return "-"
    cls = "good" if x > 1 + noise + 1e-9 else ("bad" if x < 1 - noise - 1e-9 else "")
    return f'<span class="{cls}">{x:.2f}x</span>'


def _summary_rows(report: dict[str, Any]) -> list[list[str]]:
    b, f, s = report["baseline"], report["final"], report["summary"]
    metric = report["data"]["metric"]
    rows = [
        [f"test {metric}", _score(b["accuracy"], metric), _score(f["accuracy"], metric),
         _score_delta(s["accuracy_delta"], metric)],
        ["parameters", f"{b['params']:,}", f"{f['params']:,}", _ratio(s["params_ratio"])],
        ["non-zero parameters", f"{b['nonzero_params']:,}", f"{f['nonzero_params']:,}",
         _ratio(b["nonzero_params"] / max(1, f["nonzero_params"]))],
        ["MACs per sample", f"{b['macs']:,}", f"{f['macs']:,}", _ratio(s["macs_ratio"])],
        ["file bytes (on disk)", f"{b['file_bytes']:,} ({human_bytes(b['file_bytes'])})",
         f"{f['file_bytes']:,} ({human_bytes(f['file_bytes'])})", _ratio(s["compression_ratio"])],
    ]
    if "packed" in report:
        packed = report["packed"]
        rows.append([f"packed file ({html.escape(packed['file'])})", f"{b['file_bytes']:,}",
                     f"{packed['file_bytes']:,} ({human_bytes(packed['file_bytes'])})",
                     _ratio(packed["ratio_vs_baseline"])])
    for key, speedup in s.get("speedup", {}).items():
        runtime, batch = key.split("_b")
        label = f"latency {'torch eager' if runtime == 'torch' else 'ONNX Runtime'}, batch {batch}"
        rows.append([label, f"{b['latency_ms'][key]:.3f} ms", f"{f['latency_ms'][key]:.3f} ms", _ratio(speedup, noise=0.05)])
    return rows


def _training_runs(stages: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per-epoch histories the stages recorded (their own training, and a recovery's)."""
    runs = {}
    for stage in stages:
        notes = stage.get("notes", {})
        kind = stage.get("config", {}).get("type", "")
        for name, run in [*notes.get("training", {}).items(), *notes.get("recovery", {}).get("training", {}).items()]:
            if run["history"]:  # "0:prune step1", "3:distill" rather than "0:prune prune step1", "3:distill distill"
                label = name.removeprefix(f"{kind} ") if name != kind else ""
                runs[f"{stage['name']} {label}".strip()] = run["history"]
    return runs


def _accounting_rows(table: dict[str, Any]) -> list[list[str]]:
    def num(x: float, fmt: str) -> str:
        return "-" if x != x else format(x, fmt)

    rows = [[html.escape(r["layer"]), f"{r['params']:,}", num(100 * r["weights_kept"], ".1f") + "%",
             num(r["bits_per_weight"], ".2f"), num(r["bits_per_index"], ".2f"), f"{r['codebook_bytes']:,}",
             f"{r['compressed_bytes']:,}", f"{r['ratio']:.1f}x"] for r in table["layers"]]
    return rows + [["header", "", "", "", "", "", f"{table['header_bytes']:,}", ""],
                   ["total", f"{table['params']:,}", "", "", "", "", f"{table['file_bytes']:,}",
                    f"{table['ratio_vs_fp32']:.1f}x"]]


def render_html(report: dict[str, Any]) -> str:
    stages = report["stages"]
    metric = report["data"]["metric"]
    stage_rows = [[html.escape(s["name"]), _score(s["accuracy"], metric), f"{s['params']:,}", f"{s['nonzero_params']:,}",
                   f"{s['macs']:,}", f"{s['file_bytes']:,}", f"{s['seconds']:.1f}"] for s in stages]
    recipe = report["recipe"]
    threads = report["final"].get("threads")
    data = report["data"]
    sizes = f" ({data['train']}/{data['val']}/{data['test']} train/val/test)" if "test" in data else ""
    parts = [
        f"<h1>slimkit report: {html.escape(str(recipe.get('name')))}</h1>",
        f'<p class="sub">data <b>{html.escape(data["name"])}</b>{sizes}, '
        f"slimkit {html.escape(report['slimkit_version'])}, {html.escape(report['created'])}</p>",
        "<h2>Summary: baseline vs final</h2>",
        _table(["", "baseline", "final", "change"], _summary_rows(report)),
        '<p class="note">' + "<br>".join(f"<b>{html.escape(k)}</b>: {html.escape(v)}"
                                         for k, v in report["provenance"].items())
        + (f"<br><b>threads</b>: {threads}" if threads else "") + "</p>",
        "<h2>Stages</h2>",
        _table(["stage", data["metric"], "params", "non-zero", "MACs", "file bytes", "seconds"], stage_rows),
        "<h2>Accuracy vs size</h2>", _img(plots.accuracy_vs_size(stages), "accuracy vs size"),
        "<h2>Parameters per layer</h2>",
        _img(plots.layer_params(report["layers"]["baseline"], report["layers"]["final"]), "parameters per layer"),
    ]
    if report["histograms"]:
        parts += ["<h2>Weight histograms</h2>", _img(plots.weight_histograms(report["histograms"]), "weight histograms")]
    curves = _training_runs(stages)
    if curves:
        parts += ["<h2>Training curves</h2>", _img(plots.training_curves(curves, metric), "training curves")]
    for stage in stages:
        sens = stage.get("notes", {}).get("sensitivity")
        if sens:
            parts += [f"<h2>Per-layer sensitivity ({html.escape(stage['name'])})</h2>",
                      _img(plots.sensitivity_curves(sens), "per-layer sensitivity")]
    if "packed" in report:
        parts += [f"<h2>Where the bytes of {html.escape(report['packed']['file'])} go</h2>",
                  _table(["layer", "params", "weights kept", "bits / kept weight", "bits / index", "codebook bytes",
                          "bytes", "vs fp32"], _accounting_rows(report["packed"]["accounting"]))]
    artifacts = [[html.escape(k), html.escape(str(v))] for k, v in report["artifacts"].items()]
    parts += ["<h2>Artifacts</h2>", _table(["artifact", "value"], artifacts)]
    body = "\n".join(parts)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>slimkit report</title>'
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


def write_html(report: dict[str, Any], path: str | os.PathLike) -> None:
    write_text_atomic(path, render_html(report))
