"""The terminal views of ``sftkit inspect``: summary tables, highlighted rows, rejected examples.

On a colour terminal trained tokens have a green background and untrained ones are dim. Where
there is no colour (a pipe, ``NO_COLOR``, a test), trained spans are wrapped in
:data:`TRAINED_OPEN` / :data:`TRAINED_CLOSE` instead, and token boundaries are shown with
:data:`TOKEN_SEPARATOR`, so the output still says exactly what the model learns.
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from pipeline import schema
from pipeline.report.rows import Piece, spans
from pipeline.report.summary import PERCENTILES, SOURCE_COLUMNS, DatasetSummary, source_rows
from pipeline.report.summary import as_count as _int
from pipeline.report.summary import as_share as _pct

TRAINED_OPEN = "⟦"
TRAINED_CLOSE = "⟧"
TOKEN_SEPARATOR = "▏"
RAW_PREVIEW_CHARS = 300
# Where messages are shown instead of tokens, an assistant's reasoning gets its own line,
# labelled ``[assistant reasoning]``, just before the message's content.
REASONING_LABEL = "reasoning"
REASONING_STYLE = "italic grey62"

# Two shades each so that neighbouring tokens are told apart when boundaries are asked for.
TRAINED_STYLES = ("bold white on dark_green", "bold white on green4")
UNTRAINED_STYLES = ("grey58", "grey70 on grey19")


def plain(console: Console) -> bool:
    """True where the console cannot show colour, so markers must carry the meaning."""
    return console.no_color or console.color_system is None


def print_summary(console: Console, summary: DatasetSummary) -> None:
    manifest = summary.manifest
    tokenizer = manifest.get("tokenizer") or {}
    template = manifest.get("template") or {}
    header = Text()
    header.append(f"{summary.data_dir}\n", style="bold")
    header.append(f"manifest version {manifest.get('version', '?')}, created {manifest.get('created_at', '?')}\n")
    header.append(f"tokenizer {tokenizer.get('name', '?')} ({tokenizer.get('fingerprint', '?')}), ")
    header.append(f"template {template.get('name', '?')}\n")
    header.append(
        f"{_int(summary.rows)} rows, {_int(summary.tokens)} tokens, "
        f"{_int(summary.trainable_tokens)} trained ({_pct(summary.trainable_tokens / summary.tokens if summary.tokens else 0)})"
    )
    console.print(Panel(header, title="sftkit dataset", expand=False))

    splits = Table(title="Splits", title_justify="left")
    for name in ("split", "shards", "rows", "tokens", "trained tokens", "trained share"):
        splits.add_column(name, justify="left" if name == "split" else "right")
    for s in summary.splits:
        splits.add_row(
            s["split"], _int(s["shards"]), _int(s["rows"]), _int(s["tokens"]), _int(s["trainable_tokens"]), _pct(s["trainable_share"])
        )
    console.print(splits)

    sources = Table(title="Sources", title_justify="left")
    for name in SOURCE_COLUMNS:
        sources.add_column(name, justify="left" if name == "source" else "right", overflow="fold")
    for cells in source_rows(summary.sources):
        sources.add_row(*cells)
    console.print(sources)

    lengths = Table(title="Lengths per row (tokens)", title_justify="left")
    lengths.add_column("")
    for name in [f"p{q}" for q in PERCENTILES] + ["max", "mean"]:
        lengths.add_column(name, justify="right")
    labels = {"total": "total", "trainable": "trained (response)", "untrained": "untrained (prompt+template)"}
    for key, label in labels.items():
        d = summary.lengths[key]
        lengths.add_row(label, *[f"{d[f'p{q}']:.0f}" for q in PERCENTILES], _int(d["max"]), f"{d['mean']:.1f}")
    console.print(lengths)

    print_rejected_counts(console, summary)

    counts = manifest.get("counts") or {}
    if "read" in counts:
        balanced = counts["read"] == summary.records + summary.rejected_total
        console.print(
            f"records read {_int(counts['read'])} = kept {_int(summary.records)} + rejected {_int(summary.rejected_total)}"
            + ("" if balanced else "  [bold red](does not add up: records are missing)[/]")
        )
    if summary.rows != summary.records:
        refused = counts.get("turns_rejected") or {}
        console.print(
            f"{_int(summary.records)} records are {_int(summary.rows)} rows, one per assistant turn (tokenize.reasoning: "
            f"per_turn)"
            + (
                f"; {_int(sum(refused.values()))} turns of kept records refused: "
                + ", ".join(f"{k} {v}" for k, v in sorted(refused.items()))
                if refused
                else ""
            )
        )
    if counts.get("render_mismatch"):
        console.print(
            f"[yellow]{_int(counts['render_mismatch'])} kept rows render the prompt before their last trained turn "
            "differently from the template's generation prompt[/] (training shows what inference will not; "
            "`sftkit prepare --strict-render` rejects them)"
        )
    if counts.get("turns_without_stop"):
        console.print(
            f"[yellow]{_int(counts['turns_without_stop'])} trained assistant turns end with no end-of-turn token[/] "
            "(the chat template writes none after them and sftkit knows no stop token for it: the model "
            "learns no stop from these turns)"
        )

    if summary.history:
        history = Table(title="Manifest history", title_justify="left")
        for name in ("version", "created at", "read", "kept", "shards added"):
            history.add_column(name, justify="left" if name == "created at" else "right")
        for h in summary.history:
            history.add_row(
                str(h.get("version", "")),
                str(h.get("created_at", "")),
                *[_int(h[k]) if isinstance(h.get(k), int) else str(h.get(k, "")) for k in ("read", "kept", "shards_added")],
            )
        console.print(history)


def print_rejected_counts(console: Console, summary: DatasetSummary) -> None:
    if not summary.rejected:
        console.print("No rejected records.")
        return
    read = (summary.manifest.get("counts") or {}).get("read") or (summary.rows + summary.rejected_total)
    table = Table(title=f"Rejected: {_int(summary.rejected_total)} records", title_justify="left")
    for name in ("stage", "reason", "records", "share of read"):
        table.add_column(name, justify="right" if name in ("records", "share of read") else "left")
    for stage, reasons in summary.rejected.items():
        for reason, n in reasons.items():
            table.add_row(stage, reason, _int(n), _pct(n / read if read else 0))
    console.print(table)


def print_rejected_examples(console: Console, summary: DatasetSummary, examples: list[dict[str, Any]]) -> None:
    print_rejected_counts(console, summary)
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in examples:
        grouped.setdefault((row[schema.STAGE], row[schema.REASON]), []).append(row)
    for stage, reasons in summary.rejected.items():
        for reason in reasons:
            rows = grouped.get((stage, reason), [])
            if not rows:
                continue
            console.rule(f"{stage} / {reason}", align="left")
            for row in rows:
                where = Text(f"{row[schema.SOURCE]} #{row[schema.SOURCE_INDEX]}", style="bold")
                where.append(f"  {row[schema.DETAIL]}")
                if row.get(schema.DUPLICATE_OF):
                    similarity = row.get(schema.SIMILARITY)
                    where.append(
                        f"  (duplicate of {row[schema.DUPLICATE_OF]}"
                        + (f", similarity {similarity:.2f})" if similarity is not None else ")")
                    )
                console.print(where, soft_wrap=True)
                raw = row[schema.RAW] or ""
                cut = raw[:RAW_PREVIEW_CHARS] + (f"… (+{len(raw) - RAW_PREVIEW_CHARS} chars)" if len(raw) > RAW_PREVIEW_CHARS else "")
                console.print(Text("  " + cut.replace("\n", "\\n"), style="dim"), soft_wrap=True)


def highlighted(pieces: list[Piece], *, tokens: bool, plain_text: bool) -> Text:
    """The decoded row as rich Text: trained pieces marked (colour or ⟦ ⟧), boundaries on request."""
    text = Text()
    # A token that ends inside a character adds no text (its bytes show with the next token).
    units = [p for p in pieces if p.text] if tokens else spans(pieces)
    if plain_text:
        previous_trained = False
        for i, piece in enumerate(units):
            if previous_trained and not piece.trained:
                text.append(TRAINED_CLOSE)
            if tokens and i:
                text.append(TOKEN_SEPARATOR)
            if piece.trained and not previous_trained:
                text.append(TRAINED_OPEN)
            text.append(piece.text)
            previous_trained = piece.trained
        if previous_trained:
            text.append(TRAINED_CLOSE)
        return text
    for i, piece in enumerate(units):
        styles = TRAINED_STYLES if piece.trained else UNTRAINED_STYLES
        text.append(piece.text, style=styles[i % 2] if tokens else styles[0])
    return text


def row_header(row: dict[str, Any]) -> Text:
    length, trained = row[schema.LENGTH], row[schema.NUM_TRAINABLE]
    header = Text(f"── {row.get('split', '?')} row {row.get('row', '?')}", style="bold")
    header.append(
        f"  id {row[schema.ID]}  source {row[schema.SOURCE]} #{row[schema.SOURCE_INDEX]}  "
        f"{length} tokens, {trained} trained ({_pct(trained / length if length else 0)})"
    )
    return header


def print_row(console: Console, row: dict[str, Any], pieces: list[Piece] | None, *, tokens: bool, warning: str | None) -> None:
    console.print(row_header(row), soft_wrap=True)
    if warning:
        console.print(f"[yellow]note:[/] {warning}")
    if pieces is None:
        for message in row[schema.MESSAGES]:
            if message.get("reasoning"):
                # The reasoning precedes the answer it leads to; its own line, set apart.
                thought = Text()
                thought.append(f"[{message['role']} {REASONING_LABEL}] ", style="bold")
                thought.append(message["reasoning"], style=REASONING_STYLE)
                console.print(thought, soft_wrap=True)
            label = Text(f"[{message['role']}] ", style="bold")
            label.append(message["content"])
            if message.get("tool_calls"):
                label.append(f"\n  tool_calls: {message['tool_calls']}")
            console.print(label, soft_wrap=True)
        if row.get(schema.TOOLS):
            console.print(Text(f"tools: {json.loads(row[schema.TOOLS])}"), soft_wrap=True)
        return
    console.print(highlighted(pieces, tokens=tokens, plain_text=plain(console)), soft_wrap=True)


def print_legend(console: Console, tokens: bool) -> None:
    if plain(console):
        legend = f"{TRAINED_OPEN}trained{TRAINED_CLOSE} untrained"
        if tokens:
            legend += f"; tokens separated by {TOKEN_SEPARATOR}"
        console.print(legend)
        return
    legend = Text()
    legend.append(" trained ", style=TRAINED_STYLES[0])
    legend.append(" ")
    legend.append("untrained", style=UNTRAINED_STYLES[0])
    if tokens:
        legend.append("  (alternating shades mark token boundaries)")
    console.print(legend)
