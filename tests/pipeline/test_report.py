"""``sftkit inspect``: the summary, the highlighted rows, the rejected view and the HTML report."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from flows.cli import app
from pipeline import schema
from pipeline.report import find_row, inspect_dataset, read_row, sample_rows, summarize, token_pieces
from pipeline.report.html_page import SECTION_IDS
from pipeline.report.terminal import TOKEN_SEPARATOR, TRAINED_CLOSE, TRAINED_OPEN
from tests.support.masks import trained_runs
from tests.support.report import build_dataset, one_line

TRAINED_SPAN = re.compile(re.escape(TRAINED_OPEN) + "(.*?)" + re.escape(TRAINED_CLOSE), re.S)


def run_cli(*args: str):
    # Wide, so that rich does not break long paths in error messages.
    return CliRunner().invoke(app, ["inspect", *map(str, args)], env={"COLUMNS": "400"})


def rows_shown(output: str) -> str:
    """The output without its first line (the legend, which shows the markers once itself)."""
    return output.split("\n", 1)[1]


def shard_ids_and_labels(row) -> tuple:
    return row[schema.INPUT_IDS], row[schema.LABELS]


# --- summary ----------------------------------------------------------------------------------
def test_summary_figures_match_the_shards(report_dataset):
    summary = summarize(report_dataset.path)
    for split in schema.SPLITS:
        rows = report_dataset.rows[split]
        got = next(s for s in summary.splits if s["split"] == split)
        assert got["rows"] == len(rows)
        assert got["tokens"] == sum(r[schema.LENGTH] for r in rows)
        assert got["trainable_tokens"] == sum(r[schema.NUM_TRAINABLE] for r in rows)
        assert got["shards"] == sum(1 for e in report_dataset.manifest["shards"] if e["split"] == split)

    everything = report_dataset.all_rows()
    for source in {r[schema.SOURCE] for r in everything}:
        mine = [r for r in everything if r[schema.SOURCE] == source]
        got = next(s for s in summary.sources if s[schema.SOURCE] == source)
        assert got["rows"] == len(mine)
        assert got["val_rows"] == sum(1 for r in report_dataset.rows["val"] if r[schema.SOURCE] == source)
        assert got["tokens"] == sum(r[schema.LENGTH] for r in mine)
        assert got["max_length"] == max(r[schema.LENGTH] for r in mine)

    lengths = np.array([r[schema.LENGTH] for r in everything])
    trained = np.array([r[schema.NUM_TRAINABLE] for r in everything])
    for key, values in (("total", lengths), ("trainable", trained), ("untrained", lengths - trained)):
        for q in (50, 90, 99):
            assert summary.lengths[key][f"p{q}"] == pytest.approx(np.percentile(values, q))
        assert summary.lengths[key]["max"] == values.max()

    expected: dict[str, dict[str, int]] = {}
    for r in report_dataset.rejected:
        expected.setdefault(r[schema.STAGE], {}).setdefault(r[schema.REASON], 0)
        expected[r[schema.STAGE]][r[schema.REASON]] += 1
    assert summary.rejected == expected
    assert summary.rows + summary.rejected_total == report_dataset.manifest["counts"]["read"]


def test_cli_summary_shows_splits_sources_lengths_rejected_and_history(report_dataset):
    result = run_cli(report_dataset.path)
    assert result.exit_code == 0, result.output
    out = result.output
    summary = summarize(report_dataset.path)
    for source in summary.sources:
        assert source[schema.SOURCE] in out
    assert f"{summary.rows} rows, {summary.tokens:,} tokens" in out
    for stage, reasons in summary.rejected.items():
        for reason in reasons:
            assert re.search(rf"{stage}\s+│\s+{reason}\s+│\s+{reasons[reason]}\b", out), (stage, reason)
    assert f"records read {report_dataset.manifest['counts']['read']} = kept {summary.rows} + rejected {summary.rejected_total}" in out
    assert "2026-11-27T08:00:00+00:00" in out  # version 1 of the history
    p99 = summary.lengths["total"]["p99"]
    assert re.search(rf"total\s+│\s+\d+\s+│\s+\d+\s+│\s+{p99:.0f}\s+│", out)


def test_summary_reports_rows_that_do_not_add_up(report_copy):
    manifest = json.loads((report_copy / "manifest.json").read_text())
    manifest["counts"]["read"] += 5
    (report_copy / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli(report_copy)
    assert result.exit_code == 0
    assert "does not add up" in result.output


def test_summary_shows_rows_rendered_unlike_inference(report_copy):
    result = run_cli(report_copy)
    assert "generation prompt" not in result.output  # the bundled template renders as inference does
    manifest = json.loads((report_copy / "manifest.json").read_text())
    manifest["counts"]["render_mismatch"] = 7
    (report_copy / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli(report_copy)
    assert result.exit_code == 0
    assert "7 kept rows render the prompt" in result.output and "--strict-render" in result.output


# --- rows -------------------------------------------------------------------------------------
def test_row_marks_exactly_the_trained_tokens(report_dataset, bpe_tokenizer):
    for index in (0, 3, 5, len(report_dataset.rows["train"]) - 1):  # system prompt, Chinese, multi-turn, last
        row = report_dataset.rows["train"][index]
        result = run_cli(report_dataset.path, "--row", index)
        assert result.exit_code == 0, result.output
        assert row[schema.ID] in result.output
        assert TRAINED_SPAN.findall(rows_shown(result.output)) == trained_runs(bpe_tokenizer, row[schema.INPUT_IDS], row[schema.LABELS])
        # The prompt is shown, outside the markers.
        outside = TRAINED_SPAN.sub("", rows_shown(result.output))
        user = next(m for m in row[schema.MESSAGES] if m["role"] == "user")
        assert user["content"] in outside


def test_multi_turn_row_has_one_trained_span_per_assistant_turn(report_dataset):
    index, row = next((i, r) for i, r in enumerate(report_dataset.rows["train"]) if len(r[schema.MESSAGES]) >= 4)
    result = run_cli(report_dataset.path, "--row", index)
    spans = TRAINED_SPAN.findall(rows_shown(result.output))
    assistants = [m["content"] for m in row[schema.MESSAGES] if m["role"] == "assistant"]
    assert len(spans) == len(assistants) >= 2
    for span, content in zip(spans, assistants):
        assert span.startswith(content) and span.endswith("<|im_end|>")


def test_tokens_option_shows_every_token_boundary(report_dataset, bpe_tokenizer):
    index = 0  # English only: every byte-level token decodes to whole characters
    row = report_dataset.rows["train"][index]
    result = run_cli(report_dataset.path, "--row", index, "--tokens")
    assert result.exit_code == 0, result.output
    body = result.output.split("\n", 2)[2]  # after the legend and the row header
    body = body.replace(TRAINED_OPEN, "").replace(TRAINED_CLOSE, "")
    assert body.rstrip("\n").count(TOKEN_SEPARATOR) == row[schema.LENGTH] - 1
    shown = body.split(TOKEN_SEPARATOR)
    expected = [bpe_tokenizer.decode([t], skip_special_tokens=False) for t in row[schema.INPUT_IDS]]
    assert shown[:-1] == expected[:-1]


@pytest.mark.parametrize(
    "text",
    [
        "Hello  world, 你好吗？ 😀 naïve\n\n  indented",
        "机器学习是让计算机从数据中学习规律。",
    ],
)
def test_token_pieces_rebuild_the_decoded_text(text, bpe_tokenizer, mistral_tokenizer):
    for tokenizer in (bpe_tokenizer, mistral_tokenizer):
        ids = tokenizer(text)["input_ids"]
        labels = [t if i % 2 else schema.IGNORE_INDEX for i, t in enumerate(ids)]
        pieces = token_pieces(tokenizer, ids, labels)
        assert len(pieces) == len(ids)
        assert "".join(p.text for p in pieces) == tokenizer.decode(ids, skip_special_tokens=False)
        assert [p.trained for p in pieces] == [i % 2 == 1 for i in range(len(ids))]


def test_colour_terminal_uses_background_not_markers(report_dataset):
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, color_system="256", width=120)
    inspect_dataset(report_dataset.path, row=0, console=console)
    out = buffer.getvalue()
    assert TRAINED_OPEN not in out
    reply = next(m["content"] for m in report_dataset.rows["train"][0][schema.MESSAGES] if m["role"] == "assistant")
    # dark_green is colour 22 of the 256-colour palette; the reply starts inside a green span.
    assert re.search(r"\x1b\[[0-9;]*48;5;22m" + re.escape(reply[:20]), out)


def test_id_finds_the_row_in_any_split(report_dataset):
    row = report_dataset.rows["val"][1]
    found = find_row(report_dataset.path, row[schema.ID])
    assert found["split"] == "val" and found[schema.INPUT_IDS] == row[schema.INPUT_IDS]
    result = run_cli(report_dataset.path, "--id", row[schema.ID])
    assert result.exit_code == 0 and f"id {row[schema.ID]}" in result.output
    missing = run_cli(report_dataset.path, "--id", "0" * 32)
    assert missing.exit_code == 2 and "no row with id" in missing.output


def test_read_row_crosses_shard_boundaries(report_dataset):
    rows = report_dataset.rows["train"]
    for index in (0, 19, 20, len(rows) - 1):  # 20 rows per shard in the fixture
        assert read_row(report_dataset.path, index)[schema.ID] == rows[index][schema.ID]


def test_sample_shows_distinct_rows_and_is_repeatable_with_a_seed(report_dataset):
    first = [r[schema.ID] for r in sample_rows(report_dataset.path, 5, seed=7)]
    assert len(set(first)) == 5
    assert first == [r[schema.ID] for r in sample_rows(report_dataset.path, 5, seed=7)]
    everything = sample_rows(report_dataset.path, 1000, split="val", seed=1)
    assert sorted(r[schema.ID] for r in everything) == sorted(r[schema.ID] for r in report_dataset.rows["val"])
    result = run_cli(report_dataset.path, "--sample", 3, "--seed", 7)
    assert result.exit_code == 0
    assert sum(f"id {i}" in result.output for i in first[:3]) == 3


def test_row_out_of_range_is_a_clear_error(report_dataset):
    result = run_cli(report_dataset.path, "--row", 1000)
    assert result.exit_code == 2
    message = one_line(result.output)
    assert "row 1000 is out of range" in message and f"{len(report_dataset.rows['train'])} rows" in message
    assert run_cli(report_dataset.path, "--row", 0, "--split", "test").exit_code == 2


@pytest.mark.parametrize("name", ["{dir}/no-such-tokenizer", "some-org/model-not-in-the-cache", "{dir}/shards"])
def test_unavailable_tokenizer_falls_back_to_the_messages(report_copy, name):
    manifest = json.loads((report_copy / "manifest.json").read_text())
    manifest["tokenizer"]["name"] = name.format(dir=report_copy)
    (report_copy / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli(report_copy, "--row", 0)
    assert result.exit_code == 0, result.output
    assert "showing the messages instead" in one_line(result.output)
    row = read_row(report_copy, 0)
    assert f"[user] {row[schema.MESSAGES][-1]['content']}" in result.output or "[assistant]" in result.output
    assert TRAINED_OPEN not in rows_shown(result.output)


def test_a_different_tokenizer_is_flagged(report_dataset, mistral_tokenizer_path):
    result = run_cli(report_dataset.path, "--row", 0, "--tokenizer", mistral_tokenizer_path)
    assert result.exit_code == 0, result.output
    assert "differs from the one that made the shards" in result.output


# --- rejected ---------------------------------------------------------------------------------
def test_rejected_view_counts_and_shows_examples_per_reason(report_dataset):
    result = run_cli(report_dataset.path, "--rejected")
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"Rejected: {len(report_dataset.rejected)} records" in out
    for r in report_dataset.rejected:
        assert f"{r[schema.STAGE]} / {r[schema.REASON]}" in out
        assert r[schema.DETAIL] in out
    # At most three examples per reason: the fourth refusal-like row would be over; there are 3.
    assert out.count("matched phrase") == 3
    # A long raw record is cut, and says by how much.
    long_raw = max(report_dataset.rejected, key=lambda r: len(r[schema.RAW]))[schema.RAW]
    assert f"(+{len(long_raw) - 300} chars)" in out
    assert "duplicate of " + report_dataset.rows["train"][0][schema.ID] in out


def test_a_dataset_where_everything_was_rejected_still_reports(tmp_path, bpe_tokenizer, bpe_tokenizer_path):
    empty = build_dataset(tmp_path / "empty", bpe_tokenizer, bpe_tokenizer_path, rows_per_source=0)
    summary = summarize(empty.path)
    assert summary.rows == 0 and summary.rejected_total == len(empty.rejected)
    result = run_cli(empty.path)
    assert result.exit_code == 0, result.output
    assert f"records read {len(empty.rejected)} = kept 0 + rejected {len(empty.rejected)}" in result.output
    report = tmp_path / "empty.html"
    assert run_cli(empty.path, "--html", report).exit_code == 0
    assert 'id="rejected"' in report.read_text(encoding="utf-8")


# --- errors -----------------------------------------------------------------------------------
def test_not_a_dataset_is_a_clear_error(tmp_path):
    result = run_cli(tmp_path)
    assert result.exit_code == 2 and "manifest.json does not exist" in one_line(result.output)


def test_missing_shard_is_a_clear_error(report_copy):
    (report_copy / "shards" / "val-00000.parquet").unlink()
    result = run_cli(report_copy)
    assert result.exit_code == 3  # an integrity failure (tests/faults/test_integrity.py), not a usage error
    assert "val-00000.parquet is listed in" in one_line(result.output)


# --- HTML -------------------------------------------------------------------------------------
class PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.images: list[str] = []
        self.urls: list[str] = []
        self.trained: list[str] = []
        self._in_trained = 0
        self._in_example = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "img":
            self.images.append(attrs["src"])
        for key in ("src", "href"):
            if key in attrs and tag != "img":
                self.urls.append(attrs[key])
        if tag == "pre":
            self._in_example += 1
        if tag == "span" and self._in_example and "tr" in (attrs.get("class") or "").split():
            self._in_trained += 1
            self.trained.append("")
        elif tag == "link":
            self.urls.append(attrs.get("href", ""))

    def handle_endtag(self, tag):
        if tag == "pre":
            self._in_example -= 1
        if tag == "span" and self._in_trained:
            self._in_trained -= 1

    def handle_data(self, data):
        if self._in_trained:
            self.trained[-1] += data


def test_html_report_is_self_contained_with_every_section(report_dataset, tmp_path):
    out = tmp_path / "report.html"
    result = run_cli(report_dataset.path, "--html", out)
    assert result.exit_code == 0, result.output
    page = out.read_text(encoding="utf-8")
    parser = PageParser()
    parser.feed(page)
    for section in SECTION_IDS:
        assert section in parser.ids
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page)
    assert all(url.startswith("#") for url in parser.urls)
    assert len(parser.images) >= 4
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for source in {r[schema.SOURCE] for r in report_dataset.all_rows()}:
        assert source in page
    for r in report_dataset.rejected:
        assert r[schema.REASON] in page
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]  # no temporary left behind


def test_html_examples_highlight_exactly_the_trained_tokens(report_dataset, bpe_tokenizer, tmp_path):
    out = tmp_path / "report.html"
    inspect_dataset(report_dataset.path, html=out, console=Console(file=io.StringIO()))
    page = out.read_text(encoding="utf-8")
    ids = re.findall(r"id <code>([0-9a-f]{32})</code>", page)
    assert len(ids) == 4
    assert any(find_row(report_dataset.path, i)["split"] == "val" for i in ids)
    parser = PageParser()
    parser.feed(page)
    expected = "".join("".join(trained_runs(bpe_tokenizer, *shard_ids_and_labels(find_row(report_dataset.path, i)))) for i in ids)
    assert "".join(parser.trained) == expected


# --- reasoning in the messages view --------------------------------------------------------------
def _with_reasoning(data_dir, reasoning: str) -> dict:
    """Give the assistant turns of train row 0 ``reasoning`` (rewriting its shard in place, and its
    sha256 in the manifest, as a real run would: inspect checks it)."""
    import pyarrow.parquet as pq

    from pipeline.fsutil import sha256_file

    shard = sorted((data_dir / "shards").glob("train-*.parquet"))[0]
    table = pq.read_table(shard)
    rows = table.to_pylist()
    rows[0][schema.MESSAGES] = [{**m, "reasoning": reasoning if m["role"] == "assistant" else None} for m in rows[0][schema.MESSAGES]]
    pq.write_table(type(table).from_pylist(rows, schema=schema.SHARD_SCHEMA), shard)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    for entry in manifest["shards"]:
        if entry["path"] == shard.relative_to(data_dir).as_posix():
            entry["sha256"] = sha256_file(shard)
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    return rows[0]


def _no_tokenizer(data_dir):
    manifest = json.loads((data_dir / "manifest.json").read_text())
    manifest["tokenizer"]["name"] = str(data_dir / "no-such-tokenizer")
    (data_dir / "manifest.json").write_text(json.dumps(manifest))


def test_messages_view_shows_an_assistants_reasoning_before_its_content(report_copy):
    row = _with_reasoning(report_copy, "The user wants <b>brevity</b>; answer in one line.")
    _no_tokenizer(report_copy)
    result = run_cli(report_copy, "--row", 0)
    assert result.exit_code == 0, result.output
    assert "showing the messages instead" in one_line(result.output)
    lines = result.output.splitlines()
    answer = next(m for m in row[schema.MESSAGES] if m["role"] == "assistant")
    first_answer_line = answer["content"].splitlines()[0]
    thought = lines.index("[assistant reasoning] The user wants <b>brevity</b>; answer in one line.")
    assert lines[thought + 1] == f"[assistant] {first_answer_line}"
    assert sum(line.startswith("[assistant reasoning] ") for line in lines) == sum(m["role"] == "assistant" for m in row[schema.MESSAGES])
    assert "[user reasoning]" not in result.output and "[system reasoning]" not in result.output


def test_messages_view_without_reasoning_is_unchanged(report_copy):
    _no_tokenizer(report_copy)
    result = run_cli(report_copy, "--row", 0)
    assert result.exit_code == 0, result.output
    assert "reasoning" not in result.output
    row = read_row(report_copy, 0)
    assert row[schema.MESSAGES][0]["reasoning"] is None  # the column exists and reads back null


def test_colour_messages_view_sets_reasoning_apart():
    from pipeline.report.terminal import REASONING_STYLE, print_row

    console = Console(file=io.StringIO(), force_terminal=True, color_system="truecolor", width=200)
    row = {
        schema.ID: "0" * 32,
        schema.SOURCE: "s.jsonl",
        schema.SOURCE_INDEX: 0,
        schema.LENGTH: 10,
        schema.NUM_TRAINABLE: 4,
        schema.MESSAGES: [
            schema.make_message("user", "2+2?"),
            schema.make_message("assistant", "4", reasoning="Add two and two."),
        ],
        schema.TOOLS: None,
    }
    with console.capture() as captured:
        print_row(console, row, None, tokens=False, warning=None)
    out = captured.get()
    plain_out = re.sub(r"\x1b\[[0-9;]*m", "", out)
    assert "[assistant reasoning] Add two and two.\n[assistant] 4" in plain_out
    assert re.search(r"\x1b\[3;[0-9;]*mAdd two and two\.", out)  # italic, not bold like the labels
    assert REASONING_STYLE.startswith("italic")


def test_html_messages_view_shows_reasoning_escaped_and_set_apart(report_copy, tmp_path):
    _with_reasoning(report_copy, "Think <script>alert(1)</script> & answer.")
    _no_tokenizer(report_copy)
    out = tmp_path / "report.html"
    result = run_cli(report_copy, "--html", out, "--seed", 0)
    assert result.exit_code == 0, result.output
    page = out.read_text(encoding="utf-8")
    assert "<script>alert(1)</script>" not in page
    from pipeline.report.html_page import _example_html

    row = read_row(report_copy, 0)
    html_row = _example_html({"row": row, "pieces": None, "warning": None})
    if row[schema.ID] in page:  # the report sampled the row
        assert html_row in page
    assert (
        '<span class="rs">[assistant reasoning] Think &lt;script&gt;alert(1)&lt;/script&gt; &amp; answer.</span>\n[assistant] ' in html_row
    )
    plain_row = {**row, schema.MESSAGES: [{**m, "reasoning": None} for m in row[schema.MESSAGES]]}
    assert 'class="rs"' not in _example_html({"row": plain_row, "pieces": None, "warning": None})
