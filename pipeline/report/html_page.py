"""``sftkit inspect DIR --html report.html``: one self-contained page about a prepared dataset.

Everything is inline (CSS, PNG plots as base64 data URIs, a few lines of script that mark when
all images have loaded), so the file can be mailed or archived and opens with no network. The
sections have stable ids: ``summary``, ``lengths``, ``sources``, ``rejected``, ``examples``,
``history``, and ``mixture`` when a training mixture's plan is added (``pipeline.report.plan``).
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import schema
from pipeline.fsutil import atomic_path
from pipeline.report.rows import Piece
from pipeline.report.summary import PERCENTILES, SOURCE_COLUMNS, DatasetSummary, source_rows
from pipeline.report.summary import as_count as _int
from pipeline.report.summary import as_share as _pct

SECTION_IDS = ("summary", "lengths", "sources", "rejected", "examples", "history")
RAW_PREVIEW_CHARS = 600

CSS = """
:root { --fg:#1d2330; --muted:#5d6778; --line:#dde2ea; --accent:#2563eb; --trained:#c9f2d0; --trained2:#a6e6b3;
        --untrained:#6b7280; --untrained2:#eceff3; }
* { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", "Noto Sans CJK SC", sans-serif;
       color: var(--fg); margin: 0; background: #f6f7f9; }
header { background: #111827; color: #f9fafb; padding: 20px 32px; }
header h1 { margin: 0 0 4px; font-size: 22px; }
header p { margin: 0; color: #cbd5e1; font-size: 13px; }
nav { padding: 8px 32px; background: #fff; border-bottom: 1px solid var(--line); position: sticky; top: 0; }
nav a { margin-right: 18px; color: var(--accent); text-decoration: none; font-weight: 600; }
main { max-width: 1180px; margin: 0 auto; padding: 8px 32px 48px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 18px 22px; margin-top: 18px; }
h2 { margin: 0 0 12px; font-size: 18px; }
h3 { margin: 18px 0 8px; font-size: 15px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin-bottom: 14px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; min-width: 150px; }
.card .v { font-size: 22px; font-weight: 700; }
.card .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
table { border-collapse: collapse; width: 100%; margin: 6px 0 10px; font-size: 14px; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 8px; text-align: right; vertical-align: top; }
th { background: #f3f4f6; font-weight: 600; }
td.l, th.l { text-align: left; }
img.plot { max-width: 100%; height: auto; display: block; margin: 6px 0; }
.muted { color: var(--muted); }
.example { border: 1px solid var(--line); border-radius: 8px; margin: 12px 0; }
.example .meta { background: #f3f4f6; padding: 6px 10px; font-size: 13px; border-bottom: 1px solid var(--line); }
.example pre { margin: 0; padding: 10px; white-space: pre-wrap; word-break: break-word;
               font: 13px/1.55 ui-monospace, SFMono-Regular, Menlo, Consolas, "Noto Sans Mono CJK SC", monospace; }
.tr { background: var(--trained); color: #064e1b; }
.un { color: var(--untrained); }
.rs { color: var(--muted); font-style: italic; }
#show-tokens:checked ~ .rows .tr.k1 { background: var(--trained2); }
#show-tokens:checked ~ .rows .un.k1 { background: var(--untrained2); }
#show-tokens:checked ~ .rows .k0, #show-tokens:checked ~ .rows .k1 { box-shadow: inset -1px 0 0 rgba(0,0,0,.18); }
.legend span { padding: 1px 6px; border-radius: 3px; }
.raw { font: 12px/1.45 ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; word-break: break-all;
       background: #f8fafc; border: 1px solid var(--line); padding: 6px 8px; border-radius: 6px; margin: 4px 0 10px; }
"""

# Marks the body once every image has decoded, so a headless browser test can tell broken images.
SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images', ok + '/' + imgs.length);
  document.body.setAttribute('data-images-loaded', ok === imgs.length ? 'all' : 'missing');
});
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(src: str, alt: str) -> str:
    return f'<img class="plot" src="{src}" alt="{_e(alt)}">'


def _table(headers: list[str], rows: list[list[Any]], left: int = 1) -> str:
    head = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{_e(c)}</td>' for i, c in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def length_plots(summary: DatasetSummary) -> tuple[str, str]:
    """(histograms of prompt/response/total lengths, histogram of the per-row trained share)."""
    plt = _pyplot()
    length = summary.frame[schema.LENGTH].to_numpy().astype(np.int64)
    trained = summary.frame[schema.NUM_TRAINABLE].to_numpy().astype(np.int64)
    series = [
        ("prompt + template (untrained)", length - trained, "#6b7280"),
        ("response (trained)", trained, "#16a34a"),
        ("total", length, "#2563eb"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, (title, values, colour) in zip(axes, series):
        if values.size:
            # A long tail would squeeze the bulk into a few bins: fold rows above p99.5 into the last.
            cap = float(np.percentile(values, 99.5))
            folded = values.max() > cap
            drawn = np.minimum(values, cap) if folded else values
            ax.hist(drawn, bins=min(60, max(5, int(np.unique(drawn).size))), color=colour)
            if folded:
                title += f"\n(last bin: {int((values > cap).sum()):,} rows above p99.5 = {cap:.0f})"
            for q, style in zip(PERCENTILES, (":", "--", "-.")):
                ax.axvline(np.percentile(values, q), color="#111827", linestyle=style, linewidth=1, label=f"p{q}")
            ax.legend(fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("tokens per row", fontsize=9)
        ax.tick_params(labelsize=8)
    axes[0].set_ylabel("rows", fontsize=9)
    fig.tight_layout()
    lengths_png = _png(fig)

    fig, ax = plt.subplots(figsize=(6, 2.8))
    share = np.divide(trained, length, out=np.zeros(length.shape, dtype=float), where=length > 0)
    if share.size:
        ax.hist(share, bins=40, range=(0, 1), color="#16a34a")
    ax.set_xlabel("trained tokens / row length", fontsize=9)
    ax.set_ylabel("rows", fontsize=9)
    ax.set_title("trained share per row", fontsize=10)
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    return lengths_png, _png(fig)


def barh_plot(labels: list[str], values: list[int], colour: str, xlabel: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(labels) + 1.0))
    positions = np.arange(len(labels))
    ax.barh(positions, values, color=colour)
    ax.set_yticks(positions, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel, fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return _png(fig)


def share_plot(labels: list[str], target: list[float], delivered: list[float]) -> str:
    """Grouped horizontal bars: each mixture group's target and delivered share."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(labels) + 1.0))
    positions = np.arange(len(labels))
    ax.barh(positions - 0.2, [100 * t for t in target], height=0.4, color="#9ca3af", label="target")
    ax.barh(positions + 0.2, [100 * d for d in delivered], height=0.4, color="#2563eb", label="delivered")
    ax.set_yticks(positions, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("share of the epoch (%)", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _pieces_html(pieces: list[Piece]) -> str:
    out = []
    for i, piece in enumerate(pieces):
        cls = "tr" if piece.trained else "un"
        out.append(f'<span class="{cls} k{i % 2}">{_e(piece.text)}</span>')
    return "".join(out)


def _messages_html(messages: list[dict[str, Any]]) -> str:
    """The messages of a row, one ``[role] content`` line each; an assistant's reasoning gets its
    own ``[assistant reasoning]`` line just before, in the ``rs`` style."""
    lines = []
    for m in messages:
        if m.get("reasoning"):
            lines.append(f'<span class="rs">[{_e(m["role"])} reasoning] {_e(m["reasoning"])}</span>')
        lines.append(_e(f"[{m['role']}] {m['content']}"))
    return "\n".join(lines)


def _example_html(example: dict[str, Any]) -> str:
    row, pieces, warning = example["row"], example["pieces"], example.get("warning")
    length, trained = row[schema.LENGTH], row[schema.NUM_TRAINABLE]
    meta = (
        f"<b>{_e(row.get('split', ''))} row {_e(row.get('row', ''))}</b> · id <code>{_e(row[schema.ID])}</code> · "
        f"{_e(row[schema.SOURCE])} #{_e(row[schema.SOURCE_INDEX])} · {_int(length)} tokens, "
        f"{_int(trained)} trained ({_pct(trained / length if length else 0)})"
    )
    if warning:
        meta += f'<br><span class="muted">note: {_e(warning)}</span>'
    if pieces is None:
        return f'<div class="example"><div class="meta">{meta}</div><pre>{_messages_html(row[schema.MESSAGES])}</pre></div>'
    return f'<div class="example"><div class="meta">{meta}</div><pre>{_pieces_html(pieces)}</pre></div>'


def render_html(
    summary: DatasetSummary,
    examples: list[dict[str, Any]],
    rejected_examples: list[dict[str, Any]],
    extra_sections: list[tuple[str, str]] = (),
) -> str:
    """The whole page as one string; ``extra_sections`` are ``(id, html)`` appended after the
    standard ones (the training mixture's plan, ``pipeline.report.plan``)."""
    manifest = summary.manifest
    tokenizer = manifest.get("tokenizer") or {}
    template = manifest.get("template") or {}
    share = summary.trainable_tokens / summary.tokens if summary.tokens else 0.0
    cards = [
        ("rows", _int(summary.rows)),
        ("tokens", _int(summary.tokens)),
        ("trained tokens", _int(summary.trainable_tokens)),
        ("trained share", _pct(share)),
        ("rejected records", _int(summary.rejected_total)),
        ("manifest version", _e(manifest.get("version", "?"))),
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>sftkit report: {_e(summary.data_dir.name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<header><h1>sftkit dataset report: {_e(summary.data_dir.name)}</h1>",
        f"<p>{_e(summary.data_dir)} · created {_e(manifest.get('created_at', '?'))} · tokenizer "
        f"{_e(tokenizer.get('name', '?'))} ({_e(tokenizer.get('fingerprint', '?'))}) · template {_e(template.get('name', '?'))}</p></header>",
        "<nav>" + "".join(f'<a href="#{s}">{s}</a>' for s in (*SECTION_IDS, *(i for i, _ in extra_sections))) + "</nav><main>",
    ]

    parts.append('<section id="summary"><h2>Summary</h2><div class="cards">')
    parts += [f'<div class="card"><div class="v">{v}</div><div class="k">{_e(k)}</div></div>' for k, v in cards]
    parts.append("</div>")
    parts.append(
        _table(
            ["split", "shards", "rows", "tokens", "trained tokens", "trained share"],
            [
                [s["split"], _int(s["shards"]), _int(s["rows"]), _int(s["tokens"]), _int(s["trainable_tokens"]), _pct(s["trainable_share"])]
                for s in summary.splits
            ],
        )
    )
    counts = manifest.get("counts") or {}
    if "read" in counts:
        parts.append(
            f'<p class="muted">records read {_int(counts["read"])} = kept {_int(summary.records)} + rejected {_int(summary.rejected_total)}</p>'
        )
    parts.append("</section>")

    lengths_png, share_png = length_plots(summary)
    parts.append('<section id="lengths"><h2>Lengths</h2>')
    parts.append(_img(lengths_png, "histograms of prompt, response and total lengths"))
    labels = {"untrained": "prompt + template (untrained)", "trainable": "response (trained)", "total": "total"}
    parts.append(
        _table(
            ["tokens per row"] + [f"p{q}" for q in PERCENTILES] + ["max", "mean"],
            [
                [
                    label,
                    *[f"{summary.lengths[k][f'p{q}']:.0f}" for q in PERCENTILES],
                    _int(summary.lengths[k]["max"]),
                    f"{summary.lengths[k]['mean']:.1f}",
                ]
                for k, label in labels.items()
            ],
        )
    )
    parts.append(f"<h3>Trained share: {_pct(share)} of all tokens</h3>")
    parts.append(_img(share_png, "histogram of the trained share per row"))
    parts.append("</section>")

    parts.append('<section id="sources"><h2>Sources</h2>')
    if summary.sources:
        top = summary.sources[:30]
        parts.append(_img(barh_plot([s[schema.SOURCE] for s in top], [s["rows"] for s in top], "#2563eb", "rows kept"), "rows per source"))
    parts.append(_table(list(SOURCE_COLUMNS), source_rows(summary.sources)))
    parts.append("</section>")

    parts.append('<section id="rejected"><h2>Rejected</h2>')
    if summary.rejected:
        read = counts.get("read") or (summary.rows + summary.rejected_total)
        flat = [(stage, reason, n) for stage, reasons in summary.rejected.items() for reason, n in reasons.items()]
        parts.append(
            _img(
                barh_plot([f"{s} / {r}" for s, r, _ in flat], [n for _, _, n in flat], "#dc2626", "records rejected"),
                "rejected records per stage and reason",
            )
        )
        parts.append(
            _table(
                ["stage", "reason", "records", "share of read"],
                [[s, r, _int(n), _pct(n / read if read else 0)] for s, r, n in flat],
                left=2,
            )
        )
        for stage, reason, _ in flat:
            rows = [r for r in rejected_examples if r[schema.STAGE] == stage and r[schema.REASON] == reason]
            if not rows:
                continue
            parts.append(f"<h3>{_e(stage)} / {_e(reason)}</h3>")
            for r in rows:
                raw = r[schema.RAW] or ""
                cut = raw[:RAW_PREVIEW_CHARS] + (f"… (+{len(raw) - RAW_PREVIEW_CHARS} chars)" if len(raw) > RAW_PREVIEW_CHARS else "")
                parts.append(
                    f'<div><b>{_e(r[schema.SOURCE])} #{_e(r[schema.SOURCE_INDEX])}</b> {_e(r[schema.DETAIL])}</div><div class="raw">{_e(cut)}</div>'
                )
    else:
        parts.append("<p>No rejected records.</p>")
    parts.append("</section>")

    parts.append('<section id="examples"><h2>Examples</h2>')
    parts.append(
        '<input type="checkbox" id="show-tokens"> <label for="show-tokens">show token boundaries</label>'
        '<p class="legend"><span class="tr">trained (the model learns these tokens)</span> '
        '<span class="un">untrained (prompt, template)</span></p><div class="rows">'
    )
    parts += [_example_html(example) for example in examples] or ["<p>No rows.</p>"]
    parts.append("</div></section>")

    parts.append('<section id="history"><h2>History</h2>')
    parts.append(
        _table(
            ["version", "created at", "read", "kept", "shards added"],
            [
                [h.get("version", ""), h.get("created_at", ""), h.get("read", ""), h.get("kept", ""), h.get("shards_added", "")]
                for h in summary.history
            ],
        )
        if summary.history
        else "<p>No history recorded.</p>"
    )
    parts.append("</section>")
    parts += [section for _, section in extra_sections]
    parts.append("</main>")
    parts.append(f"<script>{SCRIPT}</script></body></html>")
    return "\n".join(parts)


def write_html(path: str | os.PathLike, page: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return Path(path)
