"""What every benchmark script shares: the repository's place, the results format, measuring.

Every script writes one file, ``bench/results/<name>.json`` (``--out`` to put it elsewhere), and
:mod:`bench.table` reads them all to print the README's benchmark table:

    {"stamp": {...}, <the script's own figures>}

| key | what it holds |
|---|---|
| stamp.git | ``commit`` (short sha of HEAD) and ``dirty`` (tracked files outside bench/results differ from it) |
| stamp.machine | ``cpu`` model, ``cores`` (os.cpu_count), ``usable_cores`` (this process's affinity), ``ram_bytes``, ``gpu`` (names, or null) |
| stamp.python | the interpreter's version |
| stamp.packages | versions of torch, transformers, tokenizers, pyarrow and the peers the script measures against (null: not installed) |
| stamp.date | when the file was written, UTC, ISO 8601 to the second |
| stamp.command | how the script was run, as ``python -m bench.<name> ARGS`` |

The scripts run as modules from the repository root (``python -m bench.dedup``), so they import
``pipeline``/``trainer``/``flows`` (installed editable in .venv), each other and the tests'
fixtures without editing ``sys.path``; a child process they start runs the same way, from
:data:`REPO` (:func:`module_command`, :func:`run_child`).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
STAMPED_PACKAGES = ("torch", "transformers", "tokenizers", "pyarrow")


# --- the results format ----------------------------------------------------------------------
def argument_parser(doc: str, *, writes_results: bool = True) -> argparse.ArgumentParser:
    """A parser whose ``--help`` shows the script's docstring (its usage lines included) and, for
    a script that writes results, takes ``--out`` (default: ``bench/results/<name>.json``)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if writes_results:
        parser.add_argument("--out", type=Path, default=None, help="results file (default: bench/results/<name>.json)")
    return parser


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _gpus() -> list[str] | None:
    # torch is asked only when the script imported it already: importing it here would cost
    # seconds and memory in scripts that measure their own.
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if shutil.which("nvidia-smi"):
        try:
            done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        names = [line.strip() for line in done.stdout.splitlines() if line.strip()]
        return names or None
    return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _command() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    program = ["python", "-m", spec.name] if spec is not None else ["python", sys.argv[0]]
    return shlex.join(program + sys.argv[1:])


def stamp(packages: Sequence[str] = ()) -> dict[str, Any]:
    """Where and on what the figures were measured (see the module docstring)."""
    commit = _git("rev-parse", "--short", "HEAD")
    changes = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "git": {"commit": commit.strip() if commit else None, "dirty": bool(changes.strip()) if changes is not None else None},
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "usable_cores": usable, "ram_bytes": _ram_bytes(), "gpu": _gpus()},
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in dict.fromkeys([*STAMPED_PACKAGES, *packages])},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": _command(),
    }


def write_results(name: str, figures: dict[str, Any], out: Path | None = None, *, packages: Sequence[str] = ()) -> Path:
    """Write ``{"stamp": ..., **figures}`` to ``out`` (default ``bench/results/<name>.json``);
    ``packages`` are the peers whose versions belong in the stamp."""
    path = Path(out) if out is not None else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"stamp": stamp(packages), **figures}, indent=2, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")
    shown = path.resolve().relative_to(REPO) if path.resolve().is_relative_to(REPO) else path
    print(f"wrote {shown}")
    return path


def read_results(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# --- child processes -------------------------------------------------------------------------
def module_command(module: str, *args: object) -> list[str]:
    """``python -m module ARGS`` with this interpreter; run it from :data:`REPO` (run_child does)."""
    return [sys.executable, "-m", module, *map(str, args)]


@dataclass
class ChildRun:
    stdout: str
    seconds: float
    peak_rss_bytes: int
    tree_peak_pss_bytes: int | None = None  # the child and its worker processes together, sampled
    cpu_seconds: float | None = None  # user + system, the child's and its waited-for descendants'
    cpu_by_role: dict[str, float] | None = None  # sampled CPU seconds by process role (TreeMemory.role)
    sampler_cpu_seconds: float | None = None  # what the sampling itself cost this (the parent) process

    def last_json(self) -> Any:
        """The child's answer: the JSON on the last line it printed."""
        return json.loads(self.stdout.strip().splitlines()[-1])


def max_rss_bytes(usage: resource.struct_rusage | None = None) -> int:
    """``ru_maxrss`` in bytes (Linux counts it in KiB, macOS in bytes); this process's by default."""
    usage = usage or resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def run_child(command: Sequence[str], *, env: dict[str, str] | None = None, what: str | None = None, tree_memory: bool = False) -> ChildRun:
    """Run ``command`` from the repository root in a fresh process; its wall seconds, its CPU
    seconds (its own and its worker processes') and its own peak RSS (``os.wait4``: this child's
    alone, not the largest child so far). With
    ``tree_memory`` also the peak of the memory of the child and all its descendants together
    (:class:`TreeMemory`). Exits with the child's stderr tail when it fails."""
    with tempfile.TemporaryFile() as stderr:
        started = time.perf_counter()
        child = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=stderr, cwd=REPO, env=env)
        sampler = TreeMemory(child.pid) if tree_memory else None
        stdout = child.stdout.read()
        child.stdout.close()
        tree_peak = sampler.stop() if sampler else None
        roles = sampler.cpu_by_role() if sampler else None
        sampler_cpu = sampler.cpu_seconds if sampler else None
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            stderr.seek(0)
            tail = stderr.read().decode(errors="replace")[-3000:]
            raise SystemExit(f"{what or shlex.join(command[:4])} failed with exit code {child.returncode}:\n{tail}")
    return ChildRun(stdout.decode(), seconds, max_rss_bytes(usage), tree_peak, usage.ru_utime + usage.ru_stime, roles, sampler_cpu)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class TreeMemory:
    """Samples the proportional set size (``Pss`` of ``/proc/PID/smaps_rollup``: shared pages split
    between the processes that map them) of a process and all its descendants, summed, once a
    second; :meth:`stop` returns the largest sum seen (None where /proc has no smaps_rollup).
    Worker processes count, which a process's own ``ru_maxrss`` leaves out. Their CPU seconds
    (``/proc/PID/stat``, cheap) are read four times a second, for :meth:`cpu_by_role`.

    The sampling runs on the machine it measures: reading ``smaps_rollup`` walks each process's
    page tables in the kernel, and four times a second it took 2 CPU-seconds of a 30 s, 50k
    conversation run (4 % of the two cores that run sftkit), against 0.5 once a second.
    :attr:`cpu_seconds` is what the sampling cost; :func:`run_child` samples every child it is
    asked to the same way, so that a ratio of two runs compares equal conditions."""

    def __init__(self, pid: int, interval: float = 0.25, pss_every: int = 4) -> None:
        self.pid, self.interval, self.pss_every = pid, interval, pss_every
        self.peak: int | None = None
        self.cpu_seconds = 0.0  # the sampling thread's own CPU time
        self._cpu: dict[int, tuple[str, float]] = {}  # pid -> (role, CPU seconds when last seen)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> int | None:
        self._done.set()
        self._thread.join()
        return self.peak

    def _run(self) -> None:
        started, count = time.thread_time(), 0
        while not self._done.wait(self.interval):
            count += 1
            total = self._sample(pss=(count - 1) % self.pss_every == 0)  # the first sample, then every pss_every-th
            if total is not None:
                self.peak = max(self.peak or 0, total)
        self.cpu_seconds = time.thread_time() - started

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds of the sampled processes by :meth:`role` (a process that ended between two
        samples loses its last quarter second)."""
        roles: dict[str, float] = {}
        for role, seconds in self._cpu.values():
            roles[role] = roles.get(role, 0.0) + seconds
        return {role: round(seconds, 2) for role, seconds in sorted(roles.items())}

    def role(self, pid: int) -> str:
        """``main`` for the child itself; a worker by what it runs (``python -m pipeline.workers
        TASK [INITIALIZER]``): the tokenizer process, quality workers, step workers (ingest and
        signatures), signature workers, tokenize workers; anything else by its program name. A
        worker switched to another task (:meth:`pipeline.workers.WorkerPool.switch`) keeps the
        role it started with."""
        if pid == self.pid:
            return "main"
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                argv = cmdline.read().decode(errors="replace").split("\0")
        except OSError:
            return "other"
        if "pipeline.workers" not in argv:
            return Path(argv[0]).name if argv and argv[0] else "other"
        names = " ".join(argv[argv.index("pipeline.workers") + 1 :])
        for marker, role in (
            ("_load_in_worker", "tokenizer process"),
            ("pipeline.quality:", "quality workers"),
            ("pipeline.dedup.", "signature workers"),
            ("pipeline.tokenize:", "tokenize workers"),
            ("pipeline.steps:", "step workers"),
        ):
            if marker in names:
                return role
        return "other workers"

    def _sample(self, pss: bool = True) -> int | None:
        children: dict[int, list[int]] = {}
        cpu: dict[int, float] = {}  # utime + stime, from the same read of /proc/PID/stat
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat", "rb") as stat:
                        fields = stat.read().rsplit(b")", 1)[1].split()
                    ppid, pid = int(fields[1]), int(entry)
                    cpu[pid] = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(pid)
        total, seen, pending = 0, False, [self.pid]
        while pending:
            pid = pending.pop()
            pending.extend(children.get(pid, ()))
            if pid in cpu:
                self._cpu[pid] = (self._cpu[pid][0] if pid in self._cpu else self.role(pid), cpu[pid])
            if not pss:
                continue
            try:
                with open(f"/proc/{pid}/smaps_rollup") as rollup:
                    for line in rollup:
                        if line.startswith("Pss:"):
                            total += int(line.split()[1]) * 1024
                            seen = True
                            break
            except OSError:
                continue
        return total if seen else None


# --- memory and time -------------------------------------------------------------------------
def proc_status_bytes(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status in bytes, e.g. ``VmRSS``, ``RssAnon`` (anonymous memory) and
    ``RssFile`` (mapped files, page cache that can be dropped)."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in keys:
                fields[key] = int(value.split()[0]) * 1024
    return fields


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (worker pools), user + system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class Lap:
    seconds: float = 0.0
    cpu_seconds: float = 0.0


@contextmanager
def stopwatch() -> Iterator[Lap]:
    """``with stopwatch() as lap: ...`` then ``lap.seconds`` (wall) and ``lap.cpu_seconds``."""
    lap = Lap()
    started, cpu_started = time.perf_counter(), cpu_seconds()
    try:
        yield lap
    finally:
        lap.seconds, lap.cpu_seconds = time.perf_counter() - started, cpu_seconds() - cpu_started


def best_of(rounds: int, run: Callable[[], object]) -> float:
    """The fastest of ``rounds`` calls, in wall seconds: on a shared machine the least disturbed."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


# --- synthetic data ----------------------------------------------------------------------------
def two_message_conversations(contents: Any) -> Any:
    """A ``messages`` column of one user and one assistant message per row, from their contents
    interleaved (user 0, assistant 0, user 1, ...); the messages' other fields null."""
    import numpy as np
    import pyarrow as pa

    from pipeline import schema

    rows = len(contents) // 2
    fields = list(schema.MESSAGE_TYPE)
    children = [pa.array(["user", "assistant"] * rows), contents] + [pa.nulls(2 * rows, f.type) for f in fields[2:]]
    messages = pa.StructArray.from_arrays(children, fields=fields)
    return pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * rows + 1, 2, dtype=np.int32)), messages)


# --- printing --------------------------------------------------------------------------------
def print_table(header: Sequence[str], rows: Sequence[Sequence[object]], *, indent: int = 2) -> None:
    """Aligned columns: the first (names) to the left, the figures (already formatted) to the right."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        line = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        print(" " * indent + "  ".join(line).rstrip())
