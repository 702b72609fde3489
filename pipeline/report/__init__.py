"""``sftkit inspect``: looking at a prepared dataset before spending GPU hours on it.

* :mod:`pipeline.report.summary` — the figures (lazy polars over the narrow columns only),
* :mod:`pipeline.report.rows` — single rows and their tokens, marked trained or not,
* :mod:`pipeline.report.terminal` — the rich terminal views,
* :mod:`pipeline.report.html_page` — the self-contained HTML report,
* :mod:`pipeline.report.integrity` — every listed file against its manifest sha256, cached,
* :mod:`pipeline.report.plan` — a training mixture's pre-flight report (built by the trainer).

:func:`inspect_dataset` is what the CLI calls.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline import schema
from pipeline.report.integrity import IntegrityProblem, check_integrity
from pipeline.report.rows import find_row, load_row_tokenizer, read_row, sample_rows, token_pieces
from pipeline.report.summary import DatasetSummary, rejected_examples, summarize

__all__ = [
    "DatasetSummary",
    "IntegrityProblem",
    "check_integrity",
    "inspect_dataset",
    "summarize",
    "rejected_examples",
    "read_row",
    "find_row",
    "sample_rows",
    "token_pieces",
    "write_report",
]

HTML_EXAMPLES = 4
REJECTED_EXAMPLES_PER_REASON = 3


def _with_pieces(rows: list[dict[str, Any]], manifest: dict[str, Any], tokenizer_override: str | None) -> list[dict[str, Any]]:
    tokenizer, warning = load_row_tokenizer(manifest, tokenizer_override)
    return [
        {
            "row": row,
            "pieces": None if tokenizer is None else token_pieces(tokenizer, row[schema.INPUT_IDS], row[schema.LABELS]),
            "warning": warning,
        }
        for row in rows
    ]


def write_report(
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    examples: int = HTML_EXAMPLES,
    seed: int = 0,
    tokenizer: str | None = None,
    summary: DatasetSummary | None = None,
    mixture_plan: dict[str, Any] | None = None,
) -> Path:
    """Write the self-contained HTML report of ``data_dir`` to ``out`` (atomically), with a
    section for ``mixture_plan`` (a training mixture's report) when one is given."""
    from pipeline.report.html_page import render_html, write_html
    from pipeline.report.plan import SECTION_ID, plan_section

    summary = summary or summarize(data_dir)
    # Mostly training rows, and one row of every other split, so a reader sees both.
    splits = [s["split"] for s in summary.splits if s["rows"]]
    others = [s for s in splits if s != "train"][: max(0, examples - 1)]
    wanted = {"train": examples - len(others)} if "train" in splits else {}
    wanted.update({s: 1 for s in others})
    rows = [r for split, k in wanted.items() if k > 0 for r in sample_rows(data_dir, k, split, seed)]
    page = render_html(
        summary,
        _with_pieces(rows, summary.manifest, tokenizer),
        rejected_examples(data_dir, REJECTED_EXAMPLES_PER_REASON),
        [(SECTION_ID, plan_section(mixture_plan))] if mixture_plan else [],
    )
    return write_html(out, page)


def inspect_dataset(
    data_dir: str | os.PathLike,
    row: int | None = None,
    row_id: str | None = None,
    sample: int | None = None,
    tokens: bool = False,
    rejected: bool = False,
    html: str | os.PathLike | None = None,
    *,
    split: str = "train",
    seed: int | None = None,
    tokenizer: str | None = None,
    console=None,
    mixture_plan: dict[str, Any] | None = None,
) -> DatasetSummary | None:
    """Print the view of ``data_dir`` the options ask for (the summary when none does).

    ``row``/``row_id``/``sample`` show conversations with trained tokens highlighted (``tokens``
    adds token boundaries); ``rejected`` shows rejected counts and examples per reason; ``html``
    writes the HTML report there. ``mixture_plan`` (a training mixture's report) is printed after
    the other views, or becomes a section of the HTML report. Returns the summary when one was computed.
    """
    from rich.console import Console

    from pipeline.report import terminal

    if console is None:
        console = Console()
        if not console.is_terminal:
            # Piped output is read by people too: wider than rich's 80-column default.
            console = Console(width=120)
    data_dir = Path(data_dir)
    summary = None

    rows: list[dict[str, Any]] = []
    if row is not None:
        rows.append(read_row(data_dir, row, split))
    if row_id is not None:
        rows.append(find_row(data_dir, row_id))
    if sample is not None:
        rows += sample_rows(data_dir, sample, split, seed)
    if rows:
        from pipeline.manifest import read_manifest

        terminal.print_legend(console, tokens)
        for example in _with_pieces(rows, read_manifest(data_dir), tokenizer):
            terminal.print_row(console, example["row"], example["pieces"], tokens=tokens, warning=example["warning"])

    if rejected:
        summary = summarize(data_dir)
        terminal.print_rejected_examples(console, summary, rejected_examples(data_dir, REJECTED_EXAMPLES_PER_REASON))

    if html is not None:
        summary = summary or summarize(data_dir)
        path = write_report(data_dir, html, tokenizer=tokenizer, summary=summary, seed=seed or 0, mixture_plan=mixture_plan)
        console.print(f"wrote {path}")

    if not rows and not rejected and html is None:
        summary = summarize(data_dir)
        terminal.print_summary(console, summary)
    if mixture_plan and html is None:
        from pipeline.report.plan import print_plan

        print_plan(console, mixture_plan)
    return summary
