"""A training mixture's pre-flight report, shown: the terminal table and the HTML section/page.

The report itself is built by the trainer (``trainer.mixture_plan.build_plan``, JSON layout
documented there); this module only renders that plain dict, so ``pipeline`` stays free of the
trainer. Shown by ``sftkit plan``, at the start of ``sftkit train --mixture`` and by
``sftkit inspect [DIR] --mixture FILE [--html out.html]``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline.report.summary import as_count as _int
from pipeline.report.summary import as_share as _pct

SECTION_ID = "mixture"


def _ask(group: dict[str, Any]) -> str:
    """What the spec asked of a group, in words: "weight 0.6", "repeat 2 x", "+ cap 2,000,000"."""
    ask = f"weight {group['weight']:g}" if group.get("weight") is not None else f"repeat {group['repeat']:g}x"
    if group.get("max_tokens") is not None:
        ask += f", max {_int(group['max_tokens'])} tok"
    if group.get("train_on") == "last":
        ask += ", last turn"
    if group.get("loss_weight", 1.0) != 1.0:
        ask += f", loss x{group['loss_weight']:g}"
    return ask


def group_rows(plan: dict[str, Any]) -> list[list[str]]:
    """One table row per group: name, ask, rows, tokens, trained tokens, target, delivered, repeats."""
    return [
        [
            g["name"],
            _ask(g),
            _int(g["rows"]),
            _int(g["tokens"]),
            _int(g["trained_tokens"]),
            _pct(g["target_share"]),
            _pct(g["delivered_share"]),
            f"{g['repeats']:.2f}x",
        ]
        for g in plan["groups"]
    ]


GROUP_HEADERS = ["group", "spec", "rows", "tokens", "trained tokens", "target", "delivered", "repeats"]


def summary_lines(plan: dict[str, Any]) -> list[str]:
    by = "trained tokens" if plan["by"] == "trained_tokens" else "rows"
    steps = f"{_int(plan['steps_per_epoch'])} steps per epoch, {_int(plan['total_steps'])} in total"
    steps += f" (--max-steps {plan['max_steps']})" if plan.get("max_steps") else f" ({plan['epochs']:g} epochs)"
    return [
        f"shares are of {by}; an epoch delivers {_int(plan['delivered_rows'])} rows, {_int(plan['delivered_tokens'])} "
        f"tokens, {_int(plan['delivered_trained_tokens'])} trained",
        f"{steps} at --batch-tokens {_int(plan['batch_tokens'])}, grad-accum {plan['grad_accum']}, "
        f"{plan['world_size']} rank(s), packing {'on' if plan['packing'] else 'off'}",
        f"token slots left empty (padding, unfilled packs): {_pct(plan['padding_share'])}",
        f"rows truncated by prepare: {_int(plan['truncated_rows'])} ({_int(plan.get('truncated_tokens', 0))} tokens cut), "
        f"refused as too long: {_int(plan['too_long_rows'])}",
        f"rows with zero trained tokens: {_int(plan['zero_trained_rows'])}; rows in no group (rest: drop): "
        f"{_int(plan['dropped_rows'])}; validation rows: {_int(plan['val_rows'])}",
    ]


def print_plan(console: Console | None, plan: dict[str, Any]) -> None:
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped output is read by people too: wider than 80 columns
            console = Console(width=120)
    header = Text()
    header.append(f"mixture {plan['mixture']}", style="bold")
    header.append(f"  seed {plan['seed']}, spec {plan['spec_sha256'][:12]}\n")
    header.append("folders: " + ", ".join(plan["datasets"]))
    console.print(header)
    table = Table(show_edge=False, header_style="bold")
    for i, name in enumerate(GROUP_HEADERS):
        table.add_column(name, justify="left" if i < 2 else "right")
    # Group names, globs and paths are the user's text: shown as it is, never read as rich markup.
    for row in group_rows(plan):
        table.add_row(*(Text(cell) for cell in row))
    console.print(table)
    for line in summary_lines(plan):
        console.print(Text(line), highlight=False)
    for warning in plan["warnings"]:
        console.print(Text.assemble(("warning:", "bold yellow"), " ", warning), highlight=False)


def plan_section(plan: dict[str, Any]) -> str:
    """The ``<section id="mixture">`` of an HTML page: a share chart, the group table, the figures."""
    from pipeline.report.html_page import _e, _img, _table, share_plot

    names = [g["name"] for g in plan["groups"]]
    chart = share_plot(names, [g["target_share"] for g in plan["groups"]], [g["delivered_share"] for g in plan["groups"]])
    parts = [
        f'<section id="{SECTION_ID}"><h2>Training mixture</h2>',
        f'<p class="muted">{_e(plan["mixture"])} · seed {_e(plan["seed"])} · spec {_e(plan["spec_sha256"][:12])} · '
        f"folders {_e(', '.join(plan['datasets']))}</p>",
        _img(chart, "target and delivered share per group"),
        _table(GROUP_HEADERS, group_rows(plan), left=2),
        "<ul>" + "".join(f"<li>{_e(line)}</li>" for line in summary_lines(plan)) + "</ul>",
    ]
    if plan["warnings"]:
        parts.append("<h3>Warnings</h3><ul>" + "".join(f"<li>{_e(w)}</li>" for w in plan["warnings"]) + "</ul>")
    parts.append("</section>")
    return "\n".join(parts)


def render_plan_page(plan: dict[str, Any]) -> str:
    """A page holding only the mixture section (``sftkit inspect --mixture FILE --html out.html``)."""
    from pipeline.report.html_page import CSS, SCRIPT, _e

    title = Path(plan["mixture"]).name
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>sftkit mixture plan: {_e(title)}</title>",
            f"<style>{CSS}</style></head><body>",
            f"<header><h1>sftkit mixture plan: {_e(title)}</h1><p>{_e(plan['mixture'])}</p></header><main>",
            plan_section(plan),
            f"</main><script>{SCRIPT}</script></body></html>",
        ]
    )


def write_plan_page(path: str | os.PathLike, plan: dict[str, Any]) -> Path:
    from pipeline.report.html_page import write_html

    return write_html(path, render_plan_page(plan))
