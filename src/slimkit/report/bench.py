"""The HTML page of ``slimkit bench``: the table, the flags and two plots, self-contained."""

from __future__ import annotations

import html
import os
from typing import Any

from ..analyze.machine import describe_machine
from ..io import write_text_atomic
from . import plots
from .html import STYLE, _img, _table


def bench_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the bench table, as text: shared by the terminal and the HTML page."""
    batches = result["batches"]
    header = ["model", "runtime", "format", "accuracy", "bytes", *(f"b{b} ms (p90)" for b in batches),
              *(f"b{b} vs baseline" for b in batches), "note"]
    rows = []
    for row in result["rows"]:
        if "skipped" in row:
            rows.append([row["model"], row["runtime"], row["format"], "", "", *[""] * (2 * len(batches)),
                         f"skipped: {row['skipped']}"])
            continue
        latency = [f"{row['latency_ms'][f'b{b}']['median']:.3f} ({row['latency_ms'][f'b{b}']['p90']:.3f})"
                   for b in batches]
        ratios = [f"{row['vs_baseline'][f'b{b}']:.2f}x" if "vs_baseline" in row else "" for b in batches]
        notes = []
        if row.get("simulation"):
            notes.append("fake-quant simulation, not a deployment")
        if row.get("slower_than_baseline"):
            notes.append("SLOWER than the baseline at batch " + ", ".join(map(str, row["slower_than_baseline"])))
        rows.append([row["model"], row["runtime"], row["format"],
                     f"{100 * row['accuracy']:.2f}%" if "accuracy" in row else "",
                     f"{row['bytes']:,}" if "bytes" in row else "", *latency, *ratios, "; ".join(notes)])
    return header, rows


def render_bench_html(result: dict[str, Any]) -> str:
    header, rows = bench_rows(result)
    batches = result["batches"]
    measured = [r for r in result["rows"] if "latency_ms" in r]
    parts = [
        "<h1>slimkit bench</h1>",
        f'<p class="sub">data <b>{html.escape(result["data"])}</b> ({result["samples"]} timing inputs), '
        f"{result['threads']} thread(s), {result['rounds']} interleaved rounds; measured on "
        f"{html.escape(describe_machine(result['machine']))}</p>",
        '<p class="note">Latency: median of the rounds\' medians (90th percentile in brackets), after warm-up. '
        "Ratios: time over the first model's in the same runtime at the same batch (above 1: slower). Every "
        "file was checked in its runtime against slimkit's model before it was timed.</p>",
        _table(header, [[html.escape(c) for c in row] for row in rows], text=(1, 2, len(header) - 1)),
    ]
    if measured:
        parts += ["<h2>Latency per runtime</h2>", _img(plots.bench_latency(result["rows"], batches), "latency"),
                  "<h2>Accuracy vs latency</h2>",
                  _img(plots.accuracy_vs_latency(result["rows"], batches[0]), "accuracy vs latency")]
    body = "\n".join(parts)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>slimkit bench</title>'
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>\n")


def write_bench_html(result: dict[str, Any], path: str | os.PathLike) -> None:
    write_text_atomic(path, render_bench_html(result))
