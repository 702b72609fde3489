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

Limits, each costing one record, never the file: a record longer than ``max_record_bytes``
(JSON text: checked on the line or element before it is decoded or parsed, and skipped a chunk
at a time; a columnar row: the text and data it holds) is ``record_too_large``; one whose
arrays/objects nest deeper than ``max_nesting`` is ``too_deeply_nested`` (Python's JSON parser
would otherwise raise ``RecursionError``; an array element too deep or too long to parse is
stepped over by matching its brackets). A ``.gz``/``.zst`` file that expands past
``max_expanded_bytes`` raises :class:`InputError` once that much has come out, and reading
reports its progress (bytes, compressed bytes) every few seconds.

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
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pipeline import schema
from pipeline.formats import (
    DEFAULT_MAX_NESTING,
    INVALID_JSON,
    INVALID_UTF8,
    RECORD_TOO_LARGE,
    loads_bounded,
    nesting_exceeds,
    too_deep,
)
from pipeline.stage import Drop

CHUNK_CHARS = 1 << 20
DEFAULT_MAX_RECORD_BYTES = 16 << 20
DEFAULT_MAX_EXPANDED_BYTES = 64 << 30
PROGRESS_INTERVAL_S = 5.0

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
    error: Drop | None = None

    def raw_text(self) -> str:
        """The record's original text for the quarantine (JSON of the value for columnar inputs).

        Only what the quarantine keeps (:data:`schema.RAW_MAX_CHARS`, and one character more
        so that the cut is marked) is copied: a huge record is not duplicated to file a reject.
        """
        keep = schema.RAW_MAX_CHARS + 1
        if self.raw is not None:
            return _valid_text(self.raw[:keep])
        try:
            text = json.dumps(self.value, ensure_ascii=False, default=str)
        except (RecursionError, ValueError):
            text = f"(a {type(self.value).__name__} nested too deeply to be written as JSON)"
        return _valid_text(text[:keep])


@dataclass(frozen=True, slots=True)
class Limits:
    """What one record, and one compressed file, may hold before it is refused."""

    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES
    max_nesting: int = DEFAULT_MAX_NESTING
    max_expanded_bytes: int = DEFAULT_MAX_EXPANDED_BYTES


@dataclass(slots=True)
class ReadProgress:
    """How far the reading of one file has got (reported every few seconds, and at its end)."""

    path: Path
    bytes_read: int  # bytes read from the (decompressed) stream
    compressed_bytes: int | None  # position in the compressed file; None when not compressed
    file_bytes: int  # size of the file on disk
    done: bool = False


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
    path: Path,
    *,
    batch_size: int = 4096,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    max_nesting: int = DEFAULT_MAX_NESTING,
    max_expanded_bytes: int = DEFAULT_MAX_EXPANDED_BYTES,
    on_progress: Callable[[ReadProgress], None] | None = None,
    progress_interval_s: float = PROGRESS_INTERVAL_S,
) -> Iterator[RawRecord]:
    """Every record of ``path`` in file order; raises :class:`InputError` on container errors.

    A record longer than ``max_record_bytes`` (checked on its text before it is parsed; on the
    text it holds for columnar inputs) is ``record_too_large``; one whose arrays/objects nest
    deeper than ``max_nesting`` is ``too_deeply_nested``; the records after either are read as
    usual. A compressed file that expands past ``max_expanded_bytes`` stops with an
    :class:`InputError` before more than that is decompressed. ``on_progress`` is called with
    the bytes read so far at most every ``progress_interval_s`` seconds while a text file is
    read, and once at its end.
    """
    path = Path(path)
    container = container_of(path)
    limits = Limits(max_record_bytes, max_nesting, max_expanded_bytes)
    if container.kind == "parquet":
        yield from _iter_parquet(path, batch_size, limits)
    elif container.kind == "dataset":
        yield from _iter_dataset(path, batch_size, limits)
    else:
        meter = _Meter(path, container.compression, max_expanded_bytes, on_progress, progress_interval_s)
        yield from _guard(path, container, _iter_text(path, container, limits, meter))
        meter.report(done=True)


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


def _open_binary(path: Path, compression: str | None, meter: _Meter | None = None) -> IO[bytes]:
    if meter is None:
        meter = _Meter(path, compression, DEFAULT_MAX_EXPANDED_BYTES, None, PROGRESS_INTERVAL_S)
    source = open(path, "rb")
    if compression == "gzip":
        stream: IO[bytes] = gzip.GzipFile(fileobj=source, mode="rb")
    elif compression == "zstd":
        stream = _ZstdFrames(source)
    else:
        stream = source
    # A compressed stream is decompressed a modest buffer at a time, so that the records before
    # a corrupt spot come out before it is met.
    return io.BufferedReader(_Metered(stream, source, meter), buffer_size=CHUNK_CHARS if compression is None else 1 << 16)


def _human(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


class _Meter:
    """Counts the bytes read from one file (across its openings), enforces the expanded-size
    limit of a compressed file and reports progress every ``interval`` seconds."""

    def __init__(self, path: Path, compression: str | None, limit: int, on_progress, interval: float) -> None:
        self.path = path
        self.compression = compression
        self.limit = limit
        self.on_progress = on_progress
        self.interval = interval
        self.file_bytes = path.stat().st_size
        self.bytes_read = 0  # of the current opening
        self.compressed = 0
        self._next_report = time.monotonic() + interval

    def allowance(self) -> int | None:
        """How many more bytes this opening may read (one past the limit, to detect it)."""
        if self.compression is None:
            return None
        return self.limit + 1 - self.bytes_read

    def count(self, n: int, compressed_position: int) -> None:
        self.bytes_read += n
        self.compressed = compressed_position
        if self.compression is not None and self.bytes_read > self.limit:
            raise InputError(
                f"{self.path} expands to more than {_human(self.limit)} ({self.limit} bytes, the "
                f"ingest.max_expanded_bytes limit) when decompressed, from {_human(self.compressed)} of "
                f"{_human(self.file_bytes)} compressed; reading stopped there. A file that expands this much "
                "may be a decompression bomb; if it is genuine data, raise ingest.max_expanded_bytes in the config"
            )
        if self.on_progress is not None and time.monotonic() >= self._next_report:
            self.report()

    def report(self, done: bool = False) -> None:
        self._next_report = time.monotonic() + self.interval
        if self.on_progress is not None:
            compressed = (self.file_bytes if done else self.compressed) if self.compression else None
            self.on_progress(ReadProgress(self.path, self.bytes_read, compressed, self.file_bytes, done))

    def reopened(self) -> None:
        self.bytes_read = 0
        self.compressed = 0


class _Metered(io.RawIOBase):
    """A (decompressed) byte stream read through a :class:`_Meter`: never more than its limit."""

    def __init__(self, stream: IO[bytes], source: IO[bytes], meter: _Meter) -> None:
        self._stream = stream
        self._source = source
        self._meter = meter
        meter.reopened()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer)
        allowance = self._meter.allowance()
        if allowance is not None:
            view = view[: max(1, min(len(view), allowance))]
        n = self._stream.readinto(view)
        self._meter.count(n or 0, self._source.tell() if not self._source.closed else 0)
        return n

    def close(self) -> None:
        if not self.closed:
            self._stream.close()
            self._source.close()
        super().close()


class _ZstdFrames(io.RawIOBase):
    """Decompress one or more concatenated zstd frames; a stream cut inside a frame is an error.

    Output is produced a buffer at a time by ``zstandard``'s ``stream_reader`` (its
    ``decompressobj`` returns everything a chunk expands to at once: a few kilobytes of a zstd
    bomb are gigabytes in memory). ``stream_reader`` ends quietly at a truncated frame, which
    would drop the tail of a cut download without a word, so at the end of the stream the
    frames are walked by their block headers (cheap seeks) to check that the last one is whole.
    """

    def __init__(self, source: IO[bytes]) -> None:
        import zstandard

        self._source = source
        self._reader = zstandard.ZstdDecompressor().stream_reader(source, read_size=CHUNK_CHARS, read_across_frames=True, closefd=False)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._reader.readinto(buffer)
        if n == 0:
            problem = _zstd_frames_problem(self._source)
            if problem:
                raise EOFError(problem)
        return n

    def close(self) -> None:
        if not self.closed:
            self._reader.close()
            self._source.close()
        super().close()


_ZSTD_SKIPPABLE = range(0x184D2A50, 0x184D2A60)


def _zstd_frames_problem(source: IO[bytes]) -> str | None:
    """Why the zstd frames of ``source`` are not all whole, or None; the position is restored."""
    import zstandard

    position = source.tell()
    try:
        source.seek(0, io.SEEK_END)
        size = source.tell()
        offset = 0
        while offset < size:
            source.seek(offset)
            head = source.read(18)
            magic = int.from_bytes(head[:4], "little")
            if magic in _ZSTD_SKIPPABLE:
                if len(head) < 8:
                    return "the zstd stream ends in the middle of a skippable frame (file truncated?)"
                offset += 8 + int.from_bytes(head[4:8], "little")
                continue
            if head[:4] != ZSTD_MAGIC:
                return f"the data at byte {offset} of the zstd stream is not a zstd frame"
            try:
                offset += zstandard.frame_header_size(head)
            except zstandard.ZstdError:
                return "the zstd stream ends in the middle of a frame header (file truncated?)"
            checksum = 4 if head[4] & 0x04 else 0
            while True:
                source.seek(offset)
                block = source.read(3)
                if len(block) < 3:
                    return "the zstd stream ends in the middle of a frame (file truncated?)"
                header = int.from_bytes(block, "little")
                kind, length = (header >> 1) & 3, header >> 3
                offset += 3 + (1 if kind == 1 else length)
                if header & 1:
                    break
            offset += checksum
        if offset > size:
            return "the zstd stream ends in the middle of a frame (file truncated?)"
        return None
    finally:
        source.seek(position)


def _iter_text(path: Path, container: Container, limits: Limits, meter: _Meter) -> Iterator[RawRecord]:
    max_record_bytes = limits.max_record_bytes
    if container.kind == "jsonl":
        with _open_binary(path, container.compression, meter) as fh:
            yield from _iter_jsonl(fh, limits)
        return
    with _open_binary(path, container.compression, meter) as fh:
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
        del first_line, start
    with _open_binary(path, container.compression, meter) as fh:
        if mode == "jsonl":
            yield from _iter_jsonl(fh, limits)
        else:
            yield from _iter_json_values(fh, array=mode == "array", limits=limits)


def _is_complete_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except RecursionError:
        return line.rstrip().endswith(b"}")  # a whole line, too deep to parse: JSONL decides
    except (ValueError, UnicodeDecodeError):
        return False


def _parse(index: int, text: str, limits: Limits, what: str) -> RawRecord:
    """One record's JSON text -> its value, or ``invalid_json`` / ``too_deeply_nested``."""
    try:
        value = loads_bounded(text, limits.max_nesting, what)
    except Drop as exc:
        return RawRecord(index, raw=text, error=exc)
    except json.JSONDecodeError as exc:
        return RawRecord(index, raw=text, error=Drop(INVALID_JSON, f"{what} is not valid JSON: {exc.msg} at column {exc.colno}"))
    return RawRecord(index, value=value, raw=text)


def _iter_jsonl(fh: IO[bytes], limits: Limits) -> Iterator[RawRecord]:
    max_record_bytes = limits.max_record_bytes
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
            # Refused on its length alone: the line is never decoded or parsed, and its tail
            # is skipped a chunk at a time.
            head = line[: schema.RAW_MAX_CHARS].decode("utf-8", errors="replace")
            length = len(line)
            line = b""
            while True:
                piece = fh.readline(CHUNK_CHARS)
                length += len(piece)
                if not piece or piece.endswith(b"\n"):
                    break
            yield RawRecord(
                index,
                raw=head,
                error=Drop(
                    RECORD_TOO_LARGE,
                    f"the line is {_human(length)} long, more than the {_human(max_record_bytes)} "
                    f"(ingest.max_record_bytes = {max_record_bytes}) a record may have; it was not parsed",
                ),
            )
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
                error=Drop(INVALID_UTF8, f"byte {exc.start} of the line is not valid UTF-8 ({exc.reason})"),
            )
            index += 1
            continue
        line = b""  # drop the bytes before parsing: a big record is held twice, not three times
        yield _parse(index, text, limits, "the line")
        text = ""
        index += 1


_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\n\r"
# What finding the end of a value without parsing it needs: the next quote or bracket, and the
# rest of a string (its closing quote in group 1; a backslash cut by the buffer end in group 2).
_STRUCTURAL = re.compile(r'["\[\]{}]')
_STRING_REST = re.compile(r'(?:[^"\\]+|\\.)*(?:(")|(\\)?\Z)', re.DOTALL)


def _iter_json_values(fh: IO[bytes], *, array: bool, limits: Limits) -> Iterator[RawRecord]:
    """Elements of a top-level JSON array (or a stream of top-level values), one at a time.

    Bytes are decoded with ``surrogateescape`` so one element with invalid UTF-8 becomes an
    ``invalid_utf8`` record instead of stopping the file. When an element is cut by the buffer
    end, the buffer grows and the element is parsed again. An element that is too long or
    nested too deeply to parse is skipped by matching its brackets (strings respected), and the
    elements after it are read as usual.
    """
    max_record_bytes = limits.max_record_bytes
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

    def skip_value() -> tuple[str, int] | None:
        """Move ``pos`` past the array/object starting there without parsing it, dropping the
        text it has passed (memory stays at a buffer or one string); the value's first
        characters and its length, or None when the input ends inside it."""
        nonlocal buf, pos
        head = buf[pos : pos + schema.RAW_MAX_CHARS + 1]
        begin = scan = pos
        dropped = depth = 0
        in_string = False
        while True:
            if in_string:
                match = _STRING_REST.match(buf, scan)
                if match.group(1):
                    in_string, scan = False, match.end()
                    continue
                keep = match.end() - (1 if match.group(2) else 0)
            else:
                match = _STRUCTURAL.search(buf, scan)
                if match is not None:
                    char, scan = match.group(), match.end()
                    if char == '"':
                        in_string = True
                    elif char in "[{":
                        depth += 1
                    else:
                        depth -= 1
                        if depth == 0:
                            pos = scan
                            return head, dropped + scan - begin
                    continue
                keep = len(buf)
            dropped += keep - begin
            buf, pos, begin, scan = buf[keep:], 0, 0, 0
            if not more():
                return None

    def refused(index: int, start: int, error: Drop | None) -> tuple[RawRecord, bool]:
        """The element at ``start`` skipped unparsed and filed as ``error`` (``record_too_large``
        if None or if it is that long), and whether reading can go on after it (False when the
        input ends inside it or it is not an array/object)."""
        nonlocal pos
        pos = start
        skipped = skip_value() if buf[start] in "[{" else None
        if skipped is None:
            return RawRecord(
                index,
                raw=buf[start : start + schema.RAW_MAX_CHARS],
                error=error or Drop(RECORD_TOO_LARGE, f"element {index} is longer than {max_record_bytes} characters"),
            ), False
        head, length = skipped
        if error is None or length > max_record_bytes:
            error = Drop(
                RECORD_TOO_LARGE,
                f"element {index} is {length} characters long, more than the {max_record_bytes} "
                "(ingest.max_record_bytes) a record may have; it was not parsed",
            )
        return RawRecord(index, raw=head, error=error), True

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
                yield RawRecord(index, raw="", error=Drop(INVALID_JSON, "the JSON array ends without its closing ']' (file truncated?)"))
            return
        if array and buf[pos] == "]":
            pos += 1
            break
        start = pos
        while True:
            try:
                value, end = _DECODER.raw_decode(buf, start)
            except RecursionError:
                value, end = None, -1
                error: Drop | None = too_deep(limits.max_nesting, f"element {index}")
                break
            except json.JSONDecodeError as exc:
                maybe_cut = exc.msg.startswith("Unterminated string") or exc.pos >= len(buf) - 8
                if maybe_cut and len(buf) - start <= max_record_bytes and more(len(buf) - start):
                    start, pos = pos, pos  # ``more`` may have moved the buffer
                    continue
                if len(buf) - start > max_record_bytes:
                    value, end, error = None, -1, None
                    break
                error = Drop(
                    INVALID_JSON,
                    f"the JSON is broken in element {index} ({exc.msg}); the rest of the file cannot be split into records",
                )
                yield RawRecord(index, raw=buf[start : start + schema.RAW_MAX_CHARS], error=error)
                return
            if end == len(buf) and isinstance(value, (int, float)) and more():
                start = pos
                continue  # a number cut at the buffer end may go on
            break
        if end < 0:
            record, goes_on = refused(index, start, error)
            yield record
            if not goes_on:  # the input ended inside it: nothing after it can be split
                return
        else:
            raw = buf[start:end]
            pos = end
            if _has_surrogates(raw):
                yield RawRecord(index, raw=raw, error=Drop(INVALID_UTF8, f"element {index} contains bytes that are not valid UTF-8"))
            elif raw.count("[") + raw.count("{") > limits.max_nesting and nesting_exceeds(value, limits.max_nesting):
                yield RawRecord(index, raw=raw, error=too_deep(limits.max_nesting, f"element {index}"))
            else:
                yield RawRecord(index, value=value, raw=raw)
            value = raw = None
        index += 1
        if not array:
            continue
        if not skip_ws():
            yield RawRecord(index, raw="", error=Drop(INVALID_JSON, "the JSON array ends without its closing ']' (file truncated?)"))
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
                error=Drop(
                    INVALID_JSON, f"expected ',' or ']' after element {index - 1}; the rest of the file cannot be split into records"
                ),
            )
            return
    if skip_ws():
        yield RawRecord(
            index, raw=buf[pos : pos + schema.RAW_MAX_CHARS], error=Drop(INVALID_JSON, "text follows the closing ']' of the JSON array")
        )


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


def _iter_parquet(path: Path, batch_size: int, limits: Limits) -> Iterator[RawRecord]:
    import pyarrow as pa

    from pipeline.fsutil import open_parquet

    try:
        parquet = open_parquet(path)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path} is not a readable Parquet file: {exc}") from exc
    index = 0
    try:
        for batch in parquet.iter_batches(batch_size=batch_size):
            for record in _arrow_rows(batch, index, limits):
                yield record
                index += 1
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path} is not a readable Parquet file (failed after record {index}): {exc}") from exc


def _iter_dataset(path: Path, batch_size: int, limits: Limits) -> Iterator[RawRecord]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises several unrelated types for a broken folder
        raise InputError(f"{path} is not a readable datasets save_to_disk folder: {exc}") from exc
    splits = [loaded[name] for name in sorted(loaded)] if isinstance(loaded, datasets.DatasetDict) else [loaded]
    index = 0
    for split in splits:
        for table in split.with_format("arrow").iter(batch_size=batch_size):
            for record in _arrow_rows(table, index, limits):
                yield record
                index += 1


def _arrow_rows(table, index: int, limits: Limits) -> Iterator[RawRecord]:
    """The rows of an Arrow batch or table as records, each within the size and nesting limits.

    A columnar record has no text of its own, so its size is the text and data it holds; rows
    are only measured when the whole batch is larger than the limit, and only walked for depth
    when the schema nests deeper than the limit (the schema bounds every row's depth).
    """
    deep = _arrow_depth(table.schema) > limits.max_nesting
    big = table.nbytes > limits.max_record_bytes
    for offset, row in enumerate(table.to_pylist()):
        error = None
        if big and _size_exceeds(row, limits.max_record_bytes):
            error = Drop(
                RECORD_TOO_LARGE,
                f"the record holds more than {_human(limits.max_record_bytes)} of text and data "
                f"(ingest.max_record_bytes = {limits.max_record_bytes})",
            )
        elif deep and nesting_exceeds(row, limits.max_nesting):
            error = too_deep(limits.max_nesting)
        yield RawRecord(index + offset, value=row, error=error)


def _arrow_depth(schema_or_type) -> int:
    """How deep a row of this Arrow schema nests (the row itself, an object, is 1)."""
    import pyarrow as pa

    def depth(kind) -> int:
        if pa.types.is_struct(kind):
            return 1 + max((depth(kind.field(i).type) for i in range(kind.num_fields)), default=0)
        if pa.types.is_map(kind):
            return 1 + max(depth(kind.key_type), depth(kind.item_type))
        if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
            return 1 + depth(kind.value_type)
        return 0

    if isinstance(schema_or_type, pa.Schema):
        return 1 + max((depth(field.type) for field in schema_or_type), default=0)
    return depth(schema_or_type)


def _size_exceeds(value: Any, limit: int) -> bool:
    """Whether the text and data ``value`` holds (8 bytes a scalar) pass ``limit`` bytes."""
    total = 0
    level = [value]
    while level:
        children = []
        for item in level:
            if isinstance(item, (str, bytes, bytearray)):
                total += len(item)
            elif isinstance(item, dict):
                total += 8 * len(item)
                children.extend(item.keys())
                children.extend(item.values())
            elif isinstance(item, (list, tuple)):
                total += 8 * len(item)
                children.extend(item)
            else:
                total += 8
        if total > limit:
            return True
        level = children
    return False
