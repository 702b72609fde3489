"""What ``tokenize.reasoning: per_turn`` costs in tokens, next to ``template``, on the same data.

per_turn turns a conversation with N trained assistant turns into N rows, each repeating the
conversation before its turn as an untrained prompt, so it trains every turn's reasoning (which
templates such as Qwen3's drop from earlier turns) at the price of more tokens to process.

    .venv/bin/python -m bench.per_turn_cost [--real ../shared/data/real]

Reads every record of ``data_samples/inputs`` and of the real data folder (when present), renders
it with the official Qwen3 and DeepSeek-R1 templates and the gpt-oss one (``tests/chat_templates``) on the bundled
tokenizer, and with the bundled tokenizer's own ChatML template (reasoning put inline), and writes
``bench/results/per_turn_cost.json``: records, rows, tokens and trained tokens per policy, and the
ratios per_turn / template.
"""

from __future__ import annotations

from pathlib import Path

from bench._common import REPO, argument_parser, write_results
from pipeline import schema
from pipeline.config import TemplateConfig
from pipeline.masking import Masker
from pipeline.templates import resolve_template
from pipeline.tokenize import encode_table
from pipeline.tokenizers import load_tokenizer

# The official templates and the record reader live with the tests, in the repository (not the
# package): `python -m` from the repository root puts them on the path.
from tests.chat_templates.models import tokenizer_for
from tests.support.conversations import conversations


def measure(tokenizer, rows, policy: str) -> dict:
    import pyarrow as pa

    template = resolve_template(tokenizer, TemplateConfig())
    masker = Masker(tokenizer, template, max_length=8192, reasoning=policy)
    table = pa.Table.from_pylist(
        [
            {"id": schema.conversation_id(m, t), "source": "bench", "source_index": i, "messages": m, "tools": t}
            for i, (m, t) in enumerate(rows)
        ],
        schema=schema.CONVERSATION_SCHEMA,
    )
    kept, rejected, figures = encode_table(masker, table)
    return {
        "records": figures["records_in"],
        "records_kept": figures["records_out"],
        "rows": kept.num_rows,
        "tokens": figures["tokens"],
        "trained_tokens": figures["trainable_tokens"],
        "rejected": dict(figures["rejected"]),
    }


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument("--real", type=Path, default=REPO.parent / "shared" / "data" / "real")
    options = parser.parse_args()
    paths = sorted((REPO / "data_samples" / "inputs").glob("*.*"))
    if options.real.is_dir():
        paths += sorted(options.real.glob("*.json*"))
    rows = conversations(paths)
    with_reasoning = sum(any(m.get("reasoning") for m in messages) for messages, _ in rows)
    base = load_tokenizer(str(REPO / "data_samples" / "tokenizer"))
    reasoning_rows = [(m, t) for m, t in rows if any(x.get("reasoning") for x in m)]
    results = {}
    for name, tokenizer in (
        ("qwen3", tokenizer_for("qwen3", base)),
        ("deepseek_r1", tokenizer_for("deepseek_r1", base)),
        ("gpt_oss", tokenizer_for("gpt_oss", base)),
        ("bundled-chatml", base),
    ):
        for subset, data in (("all", rows), ("with_reasoning", reasoning_rows)):
            template, per_turn = measure(tokenizer, data, "template"), measure(tokenizer, data, "per_turn")
            results[f"{name}/{subset}"] = entry = {
                "template": template,
                "per_turn": per_turn,
                "tokens_ratio": round(per_turn["tokens"] / template["tokens"], 3),
                "trained_tokens_ratio": round(per_turn["trained_tokens"] / template["trained_tokens"], 3),
            }
            print(
                f"{name + '/' + subset:30s} rows {template['rows']:>5} -> {per_turn['rows']:>5}   "
                f"tokens x{entry['tokens_ratio']:.2f}   trained tokens x{entry['trained_tokens_ratio']:.2f}"
            )
    out = {
        "inputs": [str(p.relative_to(REPO.parent)) if p.is_relative_to(REPO.parent) else str(p) for p in paths],
        "conversations": len(rows),
        "with_reasoning": with_reasoning,
        "results": results,
    }
    print(f"{len(rows)} conversations ({with_reasoning} with reasoning)")
    write_results("per_turn_cost", out, options.out)


if __name__ == "__main__":
    main()
