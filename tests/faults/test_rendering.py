"""Faults a chat template can bring, and what sftkit does about each: nothing reaches the shards.

A template is a program from the model's author or the user's config. It can loop for hours,
write gigabytes, or fail on every row; each costs one rejected row with a reason, or one clear
error at once, never a hung or silently empty run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from pipeline.config import SFTConfig
from pipeline.formats import to_conversation
from pipeline.masking import Encoded, Masker
from pipeline.stage import Drop
from pipeline.templates import Template

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
LONG = {"messages": [{"role": "user", "content": "tell me " * 200}, {"role": "assistant", "content": "no"}]}
ROLES = (
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def masker(bpe_tokenizer, source: str, **limits) -> Masker:
    return Masker(bpe_tokenizer, Template("user-template", source), max_length=4096, span_method="locate", **limits)


def test_a_template_that_loops_on_long_rows_is_stopped_per_row(bpe_tokenizer):
    # Quadratic in the content's length: instant on short rows, hours on long ones.
    slow = "{%- for m in messages %}{%- for c in m.content %}{%- for j in range(99999) %}{%- endfor %}{%- endfor %}{%- endfor %}"
    # (Built first: its start-up probes render short conversations, seconds of this template's loop
    # on a loaded machine; the row's render is what the limit stops.)
    slow_masker = masker(bpe_tokenizer, slow + ROLES, render_timeout=0.5)
    started = time.monotonic()
    result = slow_masker.encode(*to_conversation(LONG))
    assert time.monotonic() - started < 5
    assert isinstance(result, Drop) and result.reason == "template_timeout", result
    assert "user-template" in result.detail and "template.render_timeout_s" in result.detail


def test_a_template_that_loops_on_every_row_fails_at_once_naming_itself(bpe_tokenizer):
    nested = "{%- for i in range(99999) %}{%- for j in range(99999) %}{%- endfor %}{%- endfor %}"
    started = time.monotonic()
    with pytest.raises(ValueError, match="chat template 'user-template' cannot be used: it took longer than 0.5 s"):
        masker(bpe_tokenizer, nested + ROLES, render_timeout=0.5)
    assert time.monotonic() - started < 5


def test_a_template_that_writes_without_end_is_cut_off(bpe_tokenizer):
    flood = "{%- for m in messages %}{%- if m.content | length > 100 %}{%- for i in range(99999) %}{{ m.content }}{%- endfor %}{%- endif %}{%- endfor %}"
    m = masker(bpe_tokenizer, flood + ROLES, max_render_chars=1_000_000)
    result = m.encode(*to_conversation(LONG))
    assert isinstance(result, Drop) and result.reason == "template_output_too_large", result
    assert isinstance(m.encode(*to_conversation(CHAT)), Encoded)  # short rows render as they should


def test_the_limits_leave_good_templates_alone(bpe_tokenizer):
    m = Masker(
        bpe_tokenizer, Template("chatml-ish", ROLES), max_length=4096, span_method="locate", render_timeout=0.5, max_render_chars=10_000
    )
    assert isinstance(m.encode(*to_conversation(CHAT)), Encoded)
    time.sleep(0.7)  # a limit that ran out after its render finished must never fire later
    assert isinstance(m.encode(*to_conversation(CHAT)), Encoded)


def test_a_run_whose_template_fails_every_row_stops_with_one_error(tmp_path, bpe_tokenizer_path):
    """Through the CLI: exit 2 and one sentence naming the template, not 300 quarantined rows."""
    template = tmp_path / "broken.jinja"
    # Renders a plain chat (so it passes the start-up probe) but refuses every real row.
    template.write_text(
        "{%- if messages | length < 3 and messages[0].content == 'Hi' %}"
        + ROLES
        + "{%- else %}{{ raise_exception('this template refuses everything') }}{%- endif %}"
    )
    records = tmp_path / "in.jsonl"
    records.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}) + "\n"
            for i in range(300)
        )
    )
    config = tmp_path / "config.yaml"
    config.write_text("dedup: {enabled: false}\nquality: {enabled: false}\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "prepare",
            str(records),
            "--tokenizer",
            str(bpe_tokenizer_path),
            "--out",
            str(tmp_path / "data"),
            "--template",
            str(template),
            "--config",
            str(config),
            "--no-flow",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert "failed on every one of the first 300 conversations" in message
    assert "this template refuses everything" in message and "broken.jinja" in message
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "manifest.json").exists()


def test_limits_are_settings():
    config = SFTConfig.model_validate({"template": {"render_timeout_s": 2, "max_render_chars": 1000}})
    assert config.template.render_timeout_s == 2 and config.template.max_render_chars == 1000
    with pytest.raises(ValueError):
        SFTConfig.model_validate({"template": {"render_timeout_s": 0}})


def test_a_limit_that_fires_as_its_block_ends_never_escapes_nor_lingers():
    """The watchdog may fire just as a render finishes: the timeout is taken inside the limit,
    no later code sees it, and the thread's next limit still holds."""
    import random

    import pipeline.deadline as deadline
    from pipeline.deadline import RenderTimeout, release, time_limit

    def work(n):
        total = 0
        for i in range(n):
            total += i
        return total

    escaped = 0
    for _ in range(3000):
        try:
            try:
                with time_limit(0.001):
                    work(random.randint(5_000, 60_000))  # about as long as the limit
            except RenderTimeout:
                release()
        except RenderTimeout:
            escaped += 1
    assert escaped == 0 and deadline._deadlines == {}
    started = time.monotonic()
    with pytest.raises(RenderTimeout):
        with time_limit(0.2):
            while True:
                pass
    assert time.monotonic() - started < 2
