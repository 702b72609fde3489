"""The ceiling for ``sftkit prepare``: the raw batch tokenizer alone on the same rendered text.

    python -m bench.raw_tokenizer TOKENIZER INPUT...

Reads the inputs with sftkit's readers, renders each conversation with the tokenizer's chat
template (not timed), and times only ``tokenizer(batch)`` in batches of 1,000, with the
tokenizer's own thread pool over all cores. Prints one JSON line: seconds, cpu_seconds, rows,
tokens. :mod:`bench.e2e` runs it in a fresh process beside each ``sftkit prepare``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bench._common import stopwatch
from pipeline import schema
from pipeline.formats import to_conversation
from pipeline.readers import iter_records

BATCH = 1000


def rendered_batches(tokenizer, inputs: list[Path]) -> Iterator[list[str]]:
    from pipeline.config import TemplateConfig
    from pipeline.templates import render, resolve_template, template_variables

    template = resolve_template(tokenizer, TemplateConfig())
    variables = template_variables(tokenizer)
    batch: list[str] = []
    for path in inputs:
        for record in iter_records(path):
            if record.error is not None:
                continue
            messages, tools = to_conversation(record.value)
            batch.append(render(template, variables, schema.messages_for_template(messages), schema.tools_for_template(tools))[0])
            if len(batch) == BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


def main() -> None:
    from pipeline.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(sys.argv[1])
    seconds = cpu = 0.0
    rows = tokens = 0
    for texts in rendered_batches(tokenizer, [Path(p) for p in sys.argv[2:]]):
        with stopwatch() as lap:
            encoded = tokenizer(texts)["input_ids"]
        seconds, cpu = seconds + lap.seconds, cpu + lap.cpu_seconds
        rows += len(texts)
        tokens += sum(len(ids) for ids in encoded)
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "rows": rows, "tokens": tokens}))


if __name__ == "__main__":
    main()
