"""Input containers -> a stream of raw records, one at a time, with memory flat in the file size.

This module owns what a supported input *file* is and how it is read:

=====================================  ==========================================================
``.jsonl`` ``.ndjson`` (+ ``.gz``,     one record per non-empty line; a line that is not valid
``.zst``)                              UTF-8 or not valid JSON is one rejected record, and the
                                       file goes on
``.json`` (+ ``.gz``, ``.zst``)        a JSON array, parsed element by element; a file that
                                       starts with ``{`` is read as JSONL when its first line is
                                       a complete object (a common mislabelling), else as a
                                       stream of (pretty-printed) objects
``.parquet``                           row batches via ``ParquetFile.iter_batches``
a ``datasets`` ``save_to_disk`` folder  Arrow table batches of the memory-mapped dataset (every
                                       split, in name order, for a DatasetDict folder)
=====================================  ==========================================================

Records are numbered from 0 in file order (JSONL: every non-empty line counts, so a rejected
line keeps its place). A file that is not a supported container, or that breaks at the
container level (a corrupt gzip stream, an unreadable Parquet footer), raises
:class:`InputError`: one sentence naming the file.

The JSON array reader is our own rather than ijson's because the quarantine needs each
element's original text, and ``json.JSONDecoder.raw_decode`` (the standard library's C scanner)
gives exactly that span while parsing as fast as ``json.loads``.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

from pipeline import schema
from pipeline.formats import INVALID_JSON, INVALID_UTF8, RECORD_TOO_LARGE, RecordError

CHUNK_CHARS = 1 << 20
DEFAULT_MAX_RECORD_BYTES = 64 << 20

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
PARQUET_MAGIC = b"PAR1"

SUPPORTED = ".json, .jsonl, .ndjson (each optionally .gz or .zst), .parquet, or a datasets save_to_disk folder"


class InputError(ValueError):
    """An input path that cannot be read as a supported container; stops the run."""


@dataclass(slots=True)
class RawRecord:
    """One record as read: its parsed ``value``, or the ``error`` that made it unreadable."""

    index: int
    value: Any = None
    raw: str | None = None  # original text, where the container has one
    error: RecordError | None = None

    def raw_text(self) -> str:
        """The record's original text for the quarantine (JSON of the value for columnar inputs)."""
        if self.raw is not None:
            return _valid_text(self.raw)
        return _valid_text(json.dumps(self.value, ensure_ascii=False, default=str))


# --- what a path is --------------------------------------------------------------------------
@dataclass(frozen=True)
class Container:
    kind: str  # "json" | "jsonl" | "parquet" | "dataset"
    compression: str | None = None  # None | "gzip" | "zstd"


def is_dataset_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def container_of(path: Path) -> Container:
    """What ``path`` is, checked by name and magic bytes; :class:`InputError` if unsupported."""
    if path.is_dir():
        if is_dataset_folder(path):
            return Container("dataset")
        raise InputError(
            f"{path} is a folder but not a datasets save_to_disk folder (no state.json or "
            f"dataset_dict.json); pass its files or a glob such as {path}/*.jsonl"
        )
    if not path.exists():
        raise InputError(f"{path} does not exist")
    name = path.name.lower()
    compression = None
    for suffix, kind in COMPRESSIONS.items():
        if name.endswith(suffix):
            compression, name = kind, name[: -len(suffix)]
            break
    if name.endswith(".parquet") and compression is None:
        container = Container("parquet")
    elif name.endswith(JSONL_SUFFIXES):
        container = Container("jsonl", compression)
    elif name.endswith(JSON_SUFFIXES):
        container = Container("json", compression)
    else:
        raise InputError(f"{path} is not a supported input; expected {SUPPORTED}")
    _check_magic(path, container)
    return container


def _check_magic(path: Path, container: Container) -> None:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
            if container.kind == "parquet":
                fh.seek(0, io.SEEK_END)
                if fh.tell() >= 8:
                    fh.seek(-4, io.SEEK_END)
                    tail = fh.read(4)
                else:
                    tail = b""
    except OSError as exc:
        raise InputError(f"{path} cannot be read: {exc.strerror or exc}") from exc
    if container.kind == "parquet" and (head != PARQUET_MAGIC or tail != PARQUET_MAGIC):
        raise InputError(f"{path} is named .parquet but is not a Parquet file (no PAR1 header and footer)")
    if container.compression == "gzip" and head[:2] != GZIP_MAGIC and head:
        raise InputError(f"{path} is named .gz but is not gzip-compressed")
    if container.compression == "zstd" and head != ZSTD_MAGIC and head:
        raise InputError(f"{path} is named .zst but is not zstd-compressed")


# --- reading ---------------------------------------------------------------------------------
def iter_records(
    path: Path, *, batch_size: int = 4096, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
) -> Iterator[RawRecord]:
    """Every record of ``path`` in file order; raises :class:`InputError` on container errors."""
    path = Path(path)
    container = container_of(path)
    if container.kind == "parquet":
        yield from _iter_parquet(path, batch_size)
    elif container.kind == "dataset":
        yield from _iter_dataset(path, batch_size)
    else:
        yield from _guard(path, container, _iter_text(path, container, max_record_bytes))


def _guard(path: Path, container: Container, records: Iterator[RawRecord]) -> Iterator[RawRecord]:
    """Turn decompression and I/O failures met mid-file into one clear :class:`InputError`."""
    try:
        yield from records
    except InputError:
        raise
    except (OSError, EOFError) as exc:
        what = f"{container.compression} stream" if container.compression else "file"
        raise InputError(f"{path} is not a readable {what}: {exc}") from exc
    except Exception as exc:
        if type(exc).__module__.startswith("zstandard"):
            raise InputError(f"{path} is not a readable zstd stream: {exc}") from exc
        raise


def _open_binary(path: Path, compression: str | None) -> IO[bytes]:
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "zstd":
        return io.BufferedReader(_ZstdFrames(open(path, "rb")), buffer_size=CHUNK_CHARS)
    return open(path, "rb", buffering=CHUNK_CHARS)


class _ZstdFrames(io.RawIOBase):
    """Decompress one or more concatenated zstd frames; a stream cut inside a frame is an error.

    ``zstandard``'s own ``stream_reader`` ends quietly at a truncated frame, which would drop
    the tail of a cut download without a word, so the frames are walked with ``decompressobj``.
    """

    def __init__(self, source: IO[bytes]) -> None:
        import zstandard

        self._source = source
        self._new_frame = zstandard.ZstdDecompressor().decompressobj
        self._frame = self._new_frame()
        self._in_frame = False
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            compressed = self._source.read(CHUNK_CHARS)
            if not compressed:
                if self._in_frame:
                    raise EOFError("the zstd stream ends in the middle of a frame (file truncated?)")
                return 0
            self._pending = self._decompress(compressed)
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    def _decompress(self, compressed: bytes) -> bytes:
        out = []
        while compressed:
            self._in_frame = True
            out.append(self._frame.decompress(compressed))
            if not self._frame.eof:
                break
            compressed = self._frame.unused_data
            self._frame = self._new_frame()
            self._in_frame = False
        return b"".join(out)

    def close(self) -> None:
        self._source.close()
        super().close()


def _iter_text(path: Path, container: Container, max_record_bytes: int) -> Iterator[RawRecord]:
    if container.kind == "jsonl":
        with _open_binary(path, container.compression) as fh:
            yield from _iter_jsonl(fh, max_record_bytes)
        return
    with _open_binary(path, container.compression) as fh:
        first_line = fh.readline(max_record_bytes)
        start = first_line.lstrip(b"\xef\xbb\xbf").lstrip()
        while not start and first_line:
            first_line = fh.readline(max_record_bytes)
            start = first_line.lstrip()
        if not start:
            return  # an empty file holds no records
        if start[:1] == b"{" and _is_complete_object(start):
            mode = "jsonl"
        elif start[:1] in (b"[", b"{"):
            mode = "array" if start[:1] == b"[" else "stream"
        else:
            raise InputError(f"{path} is named .json but holds neither a JSON array nor JSON objects (it starts with {start[:20]!r})")
    with _open_binary(path, container.compression) as fh:
        if mode == "jsonl":
            yield from _iter_jsonl(fh, max_record_bytes)
        else:
            yield from _iter_json_values(fh, array=mode == "array", max_record_bytes=max_record_bytes)


def _is_complete_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def _iter_jsonl(fh: IO[bytes], max_record_bytes: int) -> Iterator[RawRecord]:
    index = 0
    first = True
    while True:
        line = fh.readline(max_record_bytes + 1)
        if not line:
            return
        if first:
            line = line.removeprefix(b"\xef\xbb\xbf")
            first = False
        if len(line) > max_record_bytes and not line.endswith(b"\n"):
            head = line[: schema.RAW_MAX_CHARS].decode("utf-8", errors="replace")
            while line and not line.endswith(b"\n"):
                line = fh.readline(CHUNK_CHARS)
            yield RawRecord(index, raw=head, error=RecordError(RECORD_TOO_LARGE, f"the line is longer than {max_record_bytes} bytes"))
            index += 1
            continue
        line = line.strip()
        if not line:
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield RawRecord(
                index,
                raw=line.decode("utf-8", errors="replace"),
                error=RecordError(INVALID_UTF8, f"byte {exc.start} of the line is not valid UTF-8 ({exc.reason})"),
            )
            index += 1
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            yield RawRecord(index, raw=text, error=RecordError(INVALID_JSON, f"the line is not valid JSON: {exc.msg} at column {exc.colno}"))
        else:
            yield RawRecord(index, value=value, raw=text)
        index += 1


_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\n\r"


def _iter_json_values(fh: IO[bytes], *, array: bool, max_record_bytes: int) -> Iterator[RawRecord]:
    """Elements of a top-level JSON array (or a stream of top-level values), one at a time.

    Bytes are decoded with ``surrogateescape`` so one element with invalid UTF-8 becomes an
    ``invalid_utf8`` record instead of stopping the file. When an element is cut by the buffer
    end, the buffer grows and the element is parsed again.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    buf = ""
    pos = 0
    eof = False

    def more(min_chars: int = CHUNK_CHARS) -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        if pos > len(buf) // 2:
            buf, pos = buf[pos:], 0
        data = fh.read(max(min_chars, CHUNK_CHARS))
        if not data:
            buf += decoder.decode(b"", final=True)
            eof = True
            return False
        buf += decoder.decode(data)
        return True

    def skip_ws() -> bool:
        """Advance past whitespace; False at end of input."""
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in _WHITESPACE:
                pos += 1
            if pos < len(buf):
                return True
            if not more():
                return False

    more()
    if buf.startswith("\ufeff"):
        pos = 1
    if array:
        skip_ws()
        pos += 1  # the opening bracket, checked by the caller
    index = 0
    while True:
        if not skip_ws():
            if array:
                yield RawRecord(index, raw="", error=RecordError(INVALID_JSON, "the JSON array ends without its closing ']' (file truncated?)"))
            return
        if array and buf[pos] == "]":
            pos += 1
            break
        start = pos
        while True:
            try:
                value, end = _DECODER.raw_decode(buf, start)
            except json.JSONDecodeError as exc:
                maybe_cut = exc.msg.startswith("Unterminated string") or exc.pos >= len(buf) - 8
                if maybe_cut and len(buf) - start <= max_record_bytes and more(len(buf) - start):
                    start, pos = pos, pos  # ``more`` may have moved the buffer
                    continue
                if len(buf) - start > max_record_bytes:
                    error = RecordError(RECORD_TOO_LARGE, f"element {index} is longer than {max_record_bytes} characters")
                else:
                    error = RecordError(
                        INVALID_JSON,
                        f"the JSON is broken in element {index} ({exc.msg}); the rest of the file cannot be split into records",
                    )
                yield RawRecord(index, raw=buf[start : start + schema.RAW_MAX_CHARS], error=error)
                return
            if end == len(buf) and isinstance(value, (int, float)) and more():
                start = pos
                continue  # a number cut at the buffer end may go on
            break
        raw = buf[start:end]
        pos = end
        if _has_surrogates(raw):
            yield RawRecord(index, raw=raw, error=RecordError(INVALID_UTF8, f"element {index} contains bytes that are not valid UTF-8"))
        else:
            yield RawRecord(index, value=value, raw=raw)
        index += 1
        if not array:
            continue
        if not skip_ws():
            yield RawRecord(index, raw="", error=RecordError(INVALID_JSON, "the JSON array ends without its closing ']' (file truncated?)"))
            return
        if buf[pos] == ",":
            pos += 1
            if skip_ws() and buf[pos] == "]":  # a trailing comma: lenient, as most writers are
                pos += 1
                break
        elif buf[pos] == "]":
            pos += 1
            break
        else:
            yield RawRecord(
                index,
                raw=buf[pos : pos + schema.RAW_MAX_CHARS],
                error=RecordError(INVALID_JSON, f"expected ',' or ']' after element {index - 1}; the rest of the file cannot be split into records"),
            )
            return
    if skip_ws():
        yield RawRecord(index, raw=buf[pos : pos + schema.RAW_MAX_CHARS], error=RecordError(INVALID_JSON, "text follows the closing ']' of the JSON array"))


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _valid_text(text: str) -> str:
    """``text`` made encodable: lone surrogates (from invalid bytes or escapes) become U+FFFD."""
    if not _has_surrogates(text):
        return text
    return text.encode("utf-8", errors="surrogateescape" if _only_escaped_bytes(text) else "replace").decode("utf-8", errors="replace")


def _only_escaped_bytes(text: str) -> bool:
    return all(not ("\ud800" <= ch <= "\udfff") or "\udc80" <= ch <= "\udcff" for ch in text)


def _iter_parquet(path: Path, batch_size: int) -> Iterator[RawRecord]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path} is not a readable Parquet file: {exc}") from exc
    index = 0
    try:
        for batch in parquet.iter_batches(batch_size=batch_size):
            for row in batch.to_pylist():
                yield RawRecord(index, value=row)
                index += 1
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path} is not a readable Parquet file (failed after record {index}): {exc}") from exc


def _iter_dataset(path: Path, batch_size: int) -> Iterator[RawRecord]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises several unrelated types for a broken folder
        raise InputError(f"{path} is not a readable datasets save_to_disk folder: {exc}") from exc
    splits = [loaded[name] for name in sorted(loaded)] if isinstance(loaded, datasets.DatasetDict) else [loaded]
    index = 0
    for split in splits:
        for table in split.with_format("arrow").iter(batch_size=batch_size):
            for row in table.to_pylist():
                yield RawRecord(index, value=row)
                index += 1
