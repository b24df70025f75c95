"""A single self-contained HTML report rendered from ``report.json`` (plots embedded as PNG data URIs)."""

from __future__ import annotations

import base64
import html
import os
from typing import Any

from ..io import write_text_atomic
from . import plots
from ..analyze.machine import describe_machine
from .summary import summary_rows

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1100px;color:#1f2933;padding:0 1rem}
h1{margin-bottom:.2rem}.sub{color:#616e7c;margin-top:0}
table{border-collapse:collapse;margin:1rem 0;font-size:.92rem}
th,td{border-bottom:1px solid #e4e7eb;padding:.35rem .8rem;text-align:right}
th:first-child,td:first-child,.t{text-align:left}th{background:#f5f7fa}
.good{color:#199473;font-weight:600}.bad{color:#cf1124;font-weight:600}
.note{color:#616e7c;font-size:.85rem}img{max-width:100%;border:1px solid #e4e7eb;margin:.5rem 0}
.warn{background:#fff3c4;border:1px solid #f0b429;border-radius:4px;padding:.4rem 1rem;margin:1rem 0}
h3{font-size:1rem;margin-top:1.4rem}
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(header: list[str], rows: list[list[str]], text: tuple[int, ...] = ()) -> str:
    """An HTML table; numbers right-aligned, the first column and the ``text`` columns left-aligned."""
    def cell(tag: str, i: int, content: str) -> str:
        return f'<{tag} class="t">{content}</{tag}>' if i in text else f"<{tag}>{content}</{tag}>"

    head = "".join(cell("th", i, html.escape(h)) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _score(x: float, metric: str) -> str:
    return f"{100 * x:.2f}%" if metric == "accuracy" else f"{x:.4g}"


GOOD, BAD = ("smaller", "fewer", "faster"), ("larger", "more", "slower")


def _change(text: str, noise: float = 0.05) -> str:
    """A summary change coloured by direction; ratios within timing ``noise`` of 1 are not coloured."""
    words = text.split()
    if text.endswith("pts"):
        cls = "bad" if text.startswith("-") else "good" if float(words[0]) > 0 else ""
    elif len(words) == 2 and words[0][-1] in "x%":
        ratio = float(words[0][:-1]) if words[0].endswith("x") else 1 + float(words[0][:-1]) / 100
        cls = "" if ratio < 1 + noise and words[1] in ("faster", "slower") else (
            "good" if words[1] in GOOD else "bad" if words[1] in BAD else "")
    else:
        cls = ""
    return f'<span class="{cls}">{html.escape(text)}</span>'


def _summary_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = summary_rows(report)
    return [[html.escape(label), html.escape(before), html.escape(after), _change(change)]
            for label, before, after, change in rows]


def _training_runs(stages: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per-epoch histories the stages recorded (their own training, and a recovery's), in the order they ran."""
    runs = {}
    for stage in stages:
        notes = stage.get("notes", {})
        kind = stage.get("config", {}).get("type", "")
        for name, run in [*notes.get("training", {}).items(), *notes.get("recovery", {}).get("training", {}).items()]:
            if run["history"]:  # "0:prune step1", "3:distill" rather than "0:prune prune step1", "3:distill distill"
                label = name.removeprefix(f"{kind} ") if name != kind else ""
                runs[f"{stage['name']} {label}".strip()] = run["history"]
    return runs


def _shape(shape: list[int] | None) -> str:
    return "x".join(map(str, shape)) if shape else "-"


def _layer_notes(stages: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Per-layer remarks the stages made (a layer N:M pruning left dense, and why)."""
    out: dict[str, list[str]] = {}
    for stage in stages:
        prune = stage.get("notes", {}).get("prune")
        if isinstance(prune, dict) and "groups" not in prune:
            for layer, reason in prune.get("skipped", {}).items():
                out.setdefault(layer, []).append(f"{stage['name']} left it dense: {reason}")
    return out


def _decision_rows(rows: list[dict[str, Any]], remarks: dict[str, list[str]]) -> list[list[str]]:
    out = []
    for r in rows:
        after = " + ".join(_shape(s) for s in r["weight_after"]) or ("folded" if r["folded_into"] else "removed")
        params = f"{r['params_before']:,} -> {r['params_after']:,}"
        if r["nonzero_after"] != r["params_after"]:
            params += f" ({r['nonzero_after']:,} non-zero)"
        notes = ([f"folded into {r['folded_into']}"] if r["folded_into"] else []) + remarks.get(r["layer"], [])
        bits = r["bits"] or ("-" if r["folded_into"] or r["shared_values"] else "fp32")
        out.append([html.escape(r["layer"]), html.escape(r["type"]), f"{_shape(r['weight_before'])} -> {after}",
                    params, "-" if r["sparsity"] is None else f"{100 * r['sparsity']:.1f}%", str(bits),
                    str(r["shared_values"] or "-"), str(r["rank"] or "-"), f"{r['bytes']:,}",
                    html.escape("; ".join(notes))])
    return out


def _export_rows(stages: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for stage in stages:
        notes = stage.get("notes", {})
        for export in notes.get("exports") or ([notes["export"]] if notes.get("export") else []):
            rows.append(_export_row(stage["name"], export))
    return rows


def _export_row(stage: str, export: dict[str, Any]) -> list[str]:
    check = export["check"]
    if "top1_agreement" in check:
        verdict = (f"top-1 agreement {check['top1_agreement']:.4f}, SQNR {check['sqnr_db']:.1f} dB on "
                   f"{check['samples']} samples")
        if "deployed_vs_reference" in check:
            sim, dep = check["simulation_vs_reference"], check["deployed_vs_reference"]
            verdict += (f"; against {check['reference']}: {export['runtime']} {dep['sqnr_db']:.1f} dB, the "
                        f"simulation {sim['sqnr_db']:.1f} dB")
    elif "max_abs_diff" in check:
        verdict = (f"max abs diff {check['max_abs_diff']:.2e} (allowed {check['allowed']:.2e}) on "
                   f"{check['samples']} samples")
    else:
        verdict = f"outputs identical on {check['samples']} samples"
    return [html.escape(stage), html.escape(export["file"]), html.escape(export["format"]),
            html.escape(export["runtime"]), f"{export['bytes']:,}", html.escape(f"vs {check['against']}: {verdict}")]


def _structured_sections(stages: list[dict[str, Any]]) -> list[str]:
    """Which channel groups each structured pruning stage cut, and which it kept whole, and why."""
    parts = []
    for stage in stages:
        notes = stage.get("notes", {}).get("prune")
        for step in ([notes] if isinstance(notes, dict) else notes or []):
            if not isinstance(step, dict) or "groups" not in step:
                continue
            reached = step.get("reached")
            summary = "" if not reached else (
                f'<p class="note">requested: {100 * reached["requested_ratio"]:g}% of the channels '
                f'{"of each group" if reached["scope"] == "layer" else "overall, least important first"}; '
                f'reached: parameters {reached["params_kept"]:.3f}x ({reached["params"][0]:,} -> '
                f'{reached["params"][1]:,}), MACs {reached["macs_kept"]:.3f}x</p>')
            rows = [[html.escape(g["channels"]), str(g["kept"]), "pruned"] for g in step["groups"]]
            rows += [[html.escape(group), "all", html.escape(reason)] for group, reason in step["skipped"].items()]
            rows += [[html.escape(group), "all", html.escape("; ".join(reasons))]
                     for group, reasons in step.get("pinned", {}).items()]
            parts += [f"<h3>Channel groups of {html.escape(stage['name'])}</h3>", summary,
                      _table(["channels (producing layers)", "kept", "decision"], rows, text=(2,))]
    return parts


def _mixed_precision_sections(stages: list[dict[str, Any]]) -> list[str]:
    parts = []
    for stage in stages:
        mixed = stage.get("notes", {}).get("mixed_precision")
        if not mixed:
            continue
        rows = [[html.escape(r["layer"]), f"{r['weights']:,}", f"{100 * r['drop']:+.2f}",
                 str(mixed["layer_bits"][r["layer"]])] for r in mixed["sensitivity"]]
        parts += [f"<h3>Mixed precision of {html.escape(stage['name'])}: weights at "
                  f"{100 * mixed['weight_fraction']:.1f}% of their fp32 bytes</h3>",
                  _img(plots.bit_map(mixed), "weight bits per layer"),
                  _table(["layer", "weights", "validation drop at 4 bits (pts)", "bits chosen"], rows)]
    return parts


def _placement_sections(stages: list[dict[str, Any]]) -> list[str]:
    """Which layers a quantize stage kept in float because ONNX Runtime ran the model faster so."""
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    parts = []
    for stage in stages:
        placement = stage.get("notes", {}).get("latency_placement")
        if not placement:
            continue
        floats = set(placement["exclude"])
        rows = [[html.escape(r["layer"]), ms(r["int8_ms"]), ms(r["float_ms"]),
                 "float" if r["layer"] in floats else "int8"] for r in placement["layers"]]
        trials = [[html.escape(", ".join(t["float"])), f"{t['best_ms']:.3f}", f"{t['trial_ms']:.3f}",
                   f"{t['ratio']:.3f}", f"{t.get('worst_ratio', t['ratio']):.3f}", "kept" if t["kept"] else "rejected"]
                  for t in placement["trials"]]
        parts += [f"<h3>Float or int8 by measured latency ({html.escape(stage['name'])}): "
                  f"{len(floats)} layers kept in float</h3>",
                  f'<p class="note">ONNX Runtime, {placement["threads"]} threads, batch {placement["batch"]}: each '
                  "layer's kernel time in the int8 file and in the float graph (ms, profiler; - where no kernel "
                  "carries the layer's name), then candidates timed end to end against the best model so far.</p>",
                  _table(["layer", "int8 ms", "float ms", "chosen"], rows, text=(3,)),
                  _table(["kept in float", "best ms", "trial ms", "median ratio", "worst round", "decision"], trials,
                         text=(5,))]
    return parts


def _sensitivity_sections(stages: list[dict[str, Any]]) -> list[str]:
    parts = []
    for stage in stages:
        sens = stage.get("notes", {}).get("sensitivity")
        if not sens:
            continue
        rows = [[html.escape(name), f"{info['params']:,}", *(f"{v:.3f}" for v in info["scores"])]
                for name, info in sens["layers"].items()]
        parts += [f"<h2>Per-layer sensitivity ({html.escape(stage['name'])})</h2>",
                  _img(plots.sensitivity_curves(sens), "per-layer sensitivity"),
                  _table(["layer", "params", *(f"{100 * x:g}%" for x in sens["sparsities"])], rows)]
    return parts


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
    warnings = report.get("warnings", [])
    parts = [
        f"<h1>slimkit report: {html.escape(str(recipe.get('name')))}</h1>",
        f'<p class="sub">data <b>{html.escape(data["name"])}</b>{sizes}, '
        f"slimkit {html.escape(report['slimkit_version'])}, {html.escape(report['created'])}</p>",
        *([f'<div class="warn"><b>Warning</b><ul>{"".join(f"<li>{html.escape(w)}</li>" for w in warnings)}</ul></div>']
          if warnings else []),
        "<h2>Summary: baseline vs final</h2>",
        _table(["", "baseline", "final", "change"], _summary_rows(report)),
        '<p class="note">' + "<br>".join(f"<b>{html.escape(k)}</b>: {html.escape(v)}"
                                         for k, v in report["provenance"].items())
        + (f"<br><b>threads</b>: {threads}" if threads else "")
        + (f"<br><b>measured on</b>: {html.escape(describe_machine(report['machine']))}" if "machine" in report else "")
        + "</p>",
        "<h2>Stages</h2>",
        _table(["stage", data["metric"], "params", "non-zero", "MACs", "file bytes", "seconds"], stage_rows),
    ]
    exports = _export_rows(stages)
    if exports:
        parts += ["<h2>Exports, checked in their runtime</h2>",
                  _table(["stage", "file", "format", "runtime", "bytes", "check"], exports, text=(1, 2, 3, 5))]
    if report.get("layer_decisions"):
        parts += ["<h2>Per-layer decisions</h2>",
                  '<p class="note">What each layer of the baseline became in the final model: weight shape before '
                  "-> after (channels kept; the factors of a factorized layer), parameters, weight sparsity, "
                  "weight bits, distinct shared values, rank, and the bytes its tensors take in the final model "
                  "directory (measured).</p>",
                  _table(["layer", "type", "weight", "params", "sparsity", "bits", "shared values", "rank",
                          "bytes in file", "note"], _decision_rows(report["layer_decisions"], _layer_notes(stages)),
                          text=(1, 9))]
    parts += [*_structured_sections(stages), *_mixed_precision_sections(stages), *_placement_sections(stages)]
    parts += ["<h2>Accuracy vs size</h2>", _img(plots.accuracy_vs_size(stages), "accuracy vs size"),
              "<h2>Parameters per layer</h2>",
              _img(plots.layer_params(report["layers"]["baseline"], report["layers"]["final"]), "parameters per layer")]
    if report["histograms"]:
        parts += ["<h2>Weight histograms</h2>", _img(plots.weight_histograms(report["histograms"]), "weight histograms")]
    curves = _training_runs(stages)
    if curves:
        parts += ["<h2>Training curves</h2>",
                  '<p class="note">Every training run of the recipe, one after another on one epoch axis. Open '
                  "markers: epochs of a gradual pruning ramp, which cannot be chosen as the best; the star marks "
                  "where the target sparsity was reached.</p>",
                  _img(plots.training_curves(curves, metric), "training curves")]
    parts += _sensitivity_sections(stages)
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
