"""The one configuration model of a prepare run, loadable from YAML, with defaults that work.

Each stage reads only its own section (``config.ingest``, ``config.dedup`` ...). The whole
model is hashed into the config fingerprint that decides whether a refresh may append to an
existing dataset or must rebuild it.
"""

from __future__ import annotations

import hashlib
import json
from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FieldMapping(_Section):
    """Map a custom record layout onto the canonical conversation.

    Either a list-of-messages column (``messages`` + ``role_key``/``content_key`` + ``roles``)
    or flat prompt/response columns (``prompt`` + ``response`` + optional ``system``).
    """

    messages: str | None = None
    role_key: str = "role"
    content_key: str = "content"
    roles: dict[str, Literal["system", "user", "assistant", "tool"]] = Field(default_factory=dict)
    prompt: str | None = None
    response: str | None = None
    system: str | None = None
    tools: str | None = None


class IngestConfig(_Section):
    batch_size: int = Field(4096, gt=0, description="records per Arrow record batch")
    mapping: FieldMapping | None = Field(None, description="column/role mapping for a layout none of the built-in formats match")
    merge_consecutive_turns: bool = Field(
        True, description="join consecutive same-role turns into one; false rejects them as bad_turn_order"
    )
    # 16 MiB: a million-token conversation is ~4 MB of English or ~9 MB of \u-escaped Chinese,
    # and a record beyond it renders past template.max_render_chars (8M characters) unless it is
    # almost all escapes; while later stages hold several copies of a record, a 50 MB one
    # costs gigabytes. A longer line is refused before it is decoded or parsed.
    max_record_bytes: int = Field(
        16 << 20,
        gt=0,
        description="a longer record (its JSON text, or the text and data a columnar row holds) "
        "is rejected as record_too_large without being parsed",
    )
    max_nesting: int = Field(
        64,
        gt=0,
        le=256,
        description="a record whose arrays/objects nest deeper (JSON text inside it, such as tool-call "
        "arguments, included) is rejected as too_deeply_nested; real instruction data nests about 10 levels",
    )
    # 64 GiB: more than any one instruction-data file we know of expands to (public sets ship
    # as files of a few GB at most), so a genuine file is never refused; a decompression bomb
    # costs at most that much reading (about a minute at gzip's ~1 GB/s when it is one endless
    # line, which is skipped in bounded memory; longer when it expands to records), with
    # progress lines meanwhile. The limit is checked as bytes come out: no more is decompressed.
    max_expanded_bytes: int = Field(
        64 << 30,
        gt=0,
        description="a .gz/.zst input that decompresses to more stops the run with an error naming it",
    )


class DedupConfig(_Section):
    enabled: bool = True
    key: Literal["conversation", "prompt"] = "conversation"
    exact: bool = True
    near: bool = True
    threshold: float = Field(0.8, gt=0.0, le=1.0, description="Jaccard similarity counted as duplicate")
    num_perm: int = Field(128, gt=0)
    bands: int | None = Field(None, description="LSH bands; chosen from threshold when unset")
    rows: int | None = Field(None, description="rows per band; chosen from threshold when unset")
    word_ngram: int = Field(5, gt=0)
    char_ngram: int = Field(5, gt=0, description="shingle size for CJK and Thai text")
    verify: bool = Field(True, description="confirm LSH candidates by Jaccard (see verify_exact); off: every candidate counts")
    verify_exact: bool = Field(
        True,
        description="verify candidates by the exact Jaccard of their shingle sets, within a run and against "
        "earlier runs' index (off: by the MinHash estimate)",
    )
    seed: int = 1
    partitions: int = Field(8, gt=0, description="band-bucket partitions, one task each when scaled out")


class QualityConfig(_Section):
    enabled: bool = True
    # Each filter's own parameters; a filter missing here runs with its defaults, a filter mapped
    # to ``false`` is switched off. See pipeline/quality.py for names and parameters.
    filters: dict[str, dict | bool] = Field(default_factory=dict)
    refusal_phrases: list[str] = Field(default_factory=list, description="added to the built-in list")
    pii: Literal["redact", "drop", "off"] = "redact"
    decontaminate: list[Path] = Field(default_factory=list, description="evaluation files to keep out")
    decontaminate_ngram: int = Field(13, gt=0)
    num_proc: int | None = Field(
        None, ge=1, description="worker processes for the filters (Python: one core each); default all cores, 1 in this process"
    )


class TemplateConfig(_Section):
    name: str = Field("auto", description="auto (the tokenizer's own) | chatml | llama3 | mistral | alpaca")
    jinja_file: Path | None = Field(None, description="a custom chat template; wins over name")
    default_system: str | None = Field(None, description="system prompt added when the data has none")
    system: Literal["keep", "merge", "reject"] = Field(
        "keep",
        description="a system prompt: render it as it is, merge it into the first user turn (for templates "
        "without a system role, e.g. Gemma), or reject rows that have one",
    )
    variables: dict[str, Any] = Field(
        default_factory=dict,
        description="extra template variables, e.g. {enable_thinking: false}; recorded in the template fingerprint",
    )
    render_timeout_s: float = Field(5.0, gt=0, description="a conversation whose rendering takes longer is rejected as template_timeout")
    max_render_chars: int = Field(8_000_000, gt=0, description="a rendering that grows longer is rejected as template_output_too_large")
    today: date = Field(
        date(2024, 7, 26),
        description="the date a template sees: strftime_now() and date_string (Llama-3.1 prints it into every "
        "system header); pinned so that the same input gives the same shards on any day",
    )


class TokenizeConfig(_Section):
    max_length: int = Field(2048, gt=0)
    train_on: Literal["all_assistant", "last_assistant", "all"] = "all_assistant"
    truncate: bool = Field(False, description="cut long rows instead of rejecting them as too_long")
    batch_size: int = Field(1000, gt=0)
    num_proc: int | None = Field(None, description="tokenizer workers; default all cores")
    workers: Literal["threads", "processes"] = Field(
        "threads", description="threads (the Rust tokenizer runs without the GIL) or worker processes"
    )
    span_method: Literal["auto", "generation", "locate", "prefix"] = Field(
        "auto",
        description="how assistant turns are located: the template's {% generation %} blocks, or locate "
        "(render with sentinels and align, any template; 'prefix' is its old name), or auto "
        "(generation blocks when the template has them and they open where its generation prompt ends)",
    )
    reasoning: Literal["template", "per_turn", "drop"] = Field(
        "template",
        description="assistant reasoning: train what the template renders for the whole conversation; per_turn "
        "(one row per assistant turn, rendered and trained as the model sees it at inference, reasoning "
        "included; earlier turns untrained); or drop it",
    )
    strict_render: bool = Field(
        False,
        description="reject rows whose tokens before the last trained turn differ from the generation prompt's",
    )

    @model_validator(mode="after")
    def _per_turn_trains_turns(self) -> TokenizeConfig:
        if self.reasoning == "per_turn" and self.train_on == "all":
            raise ValueError("tokenize.reasoning: per_turn trains one assistant turn a row; it cannot go with train_on: all")
        return self


class ShardConfig(_Section):
    val_fraction: float = Field(0.01, ge=0.0, lt=1.0)
    target_rows: int = Field(50_000, gt=0, description="rows per shard file")
    compression: Literal["zstd", "snappy", "none"] = "zstd"
    row_group_rows: int = Field(2048, gt=0, description="rows per Parquet row group (the unit a reader fetches)")


class SFTConfig(_Section):
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    template: TemplateConfig = Field(default_factory=TemplateConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    shards: ShardConfig = Field(default_factory=ShardConfig)

    @classmethod
    def from_yaml(cls, path: str | Path) -> SFTConfig:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read config file {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level")
        return cls.model_validate(data)

    def output_settings(self) -> dict:
        """Every setting that can change what is written: all of them but :data:`RUNTIME_ONLY`."""
        data = self.model_dump(mode="json")
        for section, name in RUNTIME_ONLY:
            data[section].pop(name, None)
        return data

    def fingerprint(self) -> str:
        """Hash of the output settings; a change means a refresh must rebuild instead of append."""
        payload = json.dumps(self.output_settings(), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# Settings that change how fast a run goes, never what it writes (each is tested to give
# byte-identical shards): changing them must not rebuild a dataset or invalidate cached steps.
RUNTIME_ONLY = (
    ("ingest", "batch_size"),
    ("ingest", "max_expanded_bytes"),  # a run over it stops with an error; under it, it changes nothing
    ("dedup", "partitions"),
    ("quality", "num_proc"),
    ("tokenize", "batch_size"),
    ("tokenize", "num_proc"),
    ("tokenize", "workers"),
)
