"""An ordered map over worker processes, for the stages whose work is Python (one core each).

:class:`WorkerPool` starts ``num_proc`` processes as ``python -m pipeline.workers``; each
initialises once (``initializer(*init_args)``, e.g. building the quality filters) and then applies
``task`` to the items it is sent (``initializer`` may be None). :meth:`WorkerPool.map` yields the results in the items' order,
so a stage's output does not depend on the number of workers. :meth:`WorkerPool.switch` gives
running workers another initializer and task: a run's next stage takes the processes of the last
(:func:`pool`) instead of starting and importing new ones.

Why not :mod:`multiprocessing`: ``fork`` is unsafe in a process that runs threads (Prefect's task
runner, the tokenizer's pool), and ``spawn``/``forkserver`` re-run the caller's main script in each
worker, so a user's script without an ``if __name__ == "__main__"`` guard would start workers
without end. These workers import only ``pipeline`` and the module named by ``task``.

The protocol, on the worker's stdin and stdout: length-prefixed pickles (8 bytes little-endian
length, then the pickle). First ``(initializer, task, init_args)``, then one item per message; the
worker answers each with ``(True, result)`` or ``(False, exception)``. Each worker has one item in
flight, and the next is sent as soon as its answer is read, so neither side can block the other
on a full pipe. A :class:`_Switch` in place of an item initialises the worker again and names
its task from then on; it is answered ``(True, None)`` once done. A worker that dies is named with
its exit code; an exception in ``task`` (or a switch's initializer) is raised again in the caller.
Only functions of sftkit's own ``pipeline`` package can be named.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

_HEADER = 8
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


def _has_jemalloc() -> bool:
    """Whether this pyarrow has its jemalloc pool (Linux wheels do; a worker could use it)."""
    import pyarrow as pa

    try:
        pa.jemalloc_memory_pool()
    except NotImplementedError:
        return False
    return True


class _RefusePandas:
    """An import finder under which ``import pandas`` fails (see :func:`arrow_without_pandas`)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "pandas":
            raise ImportError("pandas is not imported for pyarrow's first look (sftkit)")


def arrow_without_pandas() -> None:
    """Keep pyarrow from importing pandas in one of sftkit's own processes, where nothing hands
    it a pandas object.

    pyarrow's first ``pa.array``, ``pa.table`` or ``Table.from_pylist`` asks whether pandas is
    installed by importing it, to recognise pandas objects it might be given: 0.2-0.3 CPU-s and
    about 45 MiB of memory in every process of a run (the run's own, each worker, the
    tokenizer's). Here that first question is asked while ``import pandas`` fails, so pyarrow
    notes "no pandas" and does not ask again; what needs pandas (``Table.to_pandas``,
    ``Table.from_pandas``) still imports it when called. After this, a pandas object given to ``pa.array`` is read as a plain
    sequence (a ``Categorical`` becomes strings, NaN stays NaN): so only ``sftkit prepare`` and
    the worker processes call this, never a process that runs a user's code (``sftkit train``
    runs callbacks; the Python API runs in the caller's process), and a process that has pandas
    already is left as it is.
    """
    if "pandas" in sys.modules:
        return
    import pyarrow as pa

    refuse = _RefusePandas()
    sys.meta_path.insert(0, refuse)
    try:
        pa.array([])
    finally:
        sys.meta_path.remove(refuse)


class WorkerError(RuntimeError):
    """A worker process died, or answered something that is not the protocol."""


class _Switch(NamedTuple):
    """Sent in place of an item: run ``initializer(*init_args)`` and apply ``task`` from now on."""

    initializer: str | None
    task: str
    init_args: tuple


def _send(stream: BinaryIO, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(len(data).to_bytes(_HEADER, "little"))
    stream.write(data)
    stream.flush()


def _receive(stream: BinaryIO) -> Any:
    header = stream.read(_HEADER)
    if len(header) < _HEADER:
        raise EOFError
    size = int.from_bytes(header, "little")
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


def _resolve(name: str) -> Callable[..., Any]:
    module, _, function = name.partition(":")
    if module != "pipeline" and not module.startswith("pipeline."):
        raise ValueError(f"a worker runs sftkit's pipeline functions only, not {name!r}")
    return getattr(importlib.import_module(module), function)


class WorkerPool:
    """``num_proc`` worker processes applying ``task`` (``"module:function"``) to items in order.

    ::

        with WorkerPool("pipeline.quality:_init_worker", "pipeline.quality:_in_worker", (config_json,), 2) as pool:
            for result in pool.map(batches):
                ...
    """

    def __init__(self, initializer: str | None, task: str, init_args: tuple, num_proc: int) -> None:
        if initializer is not None:
            _resolve(initializer)  # fail here, not in a worker, on a bad name
        _resolve(task)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        env["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
        if "ARROW_DEFAULT_MEMORY_POOL" not in env and _has_jemalloc():
            env["ARROW_DEFAULT_MEMORY_POOL"] = "jemalloc"  # see flows._env: 110-180 MiB less per stage
        self._workers: list[subprocess.Popen] = []
        self._in_flight = 0
        self._switching = False  # a switch sent, its answers not read yet
        self._mixed = False  # a switch failed in some worker: the workers run different tasks
        try:
            for _ in range(max(1, num_proc)):
                worker = subprocess.Popen(
                    # what it runs, after the module: ps and the benchmarks tell the workers apart
                    [sys.executable, "-m", "pipeline.workers", task, *([initializer] if initializer else [])],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    env=env,
                )
                self._workers.append(worker)
                _send(worker.stdin, (initializer, task, init_args))
        except BaseException:
            self.close()
            raise

    def switch(self, initializer: str | None, task: str, init_args: tuple) -> None:
        """From now on initialise with ``initializer(*init_args)`` and apply ``task``: sent to every
        worker now, it runs there while the caller goes on; the next :meth:`map` waits for it (and
        raises what an initializer raised). Workers keep the command line they started with."""
        if initializer is not None:
            _resolve(initializer)
        _resolve(task)
        for worker in self._workers:
            try:
                _send(worker.stdin, _Switch(initializer, task, init_args))
            except BrokenPipeError as exc:
                raise self._died(worker) from exc
        self._switching = True

    def _switched(self) -> None:
        if not self._switching:
            return
        self._switching = False
        failed = None
        for worker in self._workers:
            try:
                ok, value = _receive(worker.stdout)
            except (EOFError, pickle.UnpicklingError, ValueError) as exc:
                raise self._died(worker) from exc
            if not ok:
                failed = failed or value
        if failed is not None:
            self._mixed = True  # never handed on (idle is False)
            raise failed

    def map(self, items: Iterable[Any]) -> Iterator[Any]:
        """``task(item)`` for every item, in the items' order."""
        self._switched()
        items = iter(items)
        count = len(self._workers)
        # Item i goes to worker i % count; each worker holds one item at a time.
        busy = [self._submit(worker, item) for worker, item in zip(self._workers, islice(items, count))]
        position = 0
        while any(busy):
            worker = self._workers[position % count]
            if not busy[position % count]:
                break
            result = self._answer(worker)
            busy[position % count] = self._submit(worker, next(items, _DONE))
            position += 1
            yield result

    def _submit(self, worker: subprocess.Popen, item: Any) -> bool:
        if item is _DONE:
            return False
        try:
            _send(worker.stdin, item)
        except BrokenPipeError as exc:
            raise self._died(worker) from exc
        self._in_flight += 1
        return True

    def _answer(self, worker: subprocess.Popen) -> Any:
        try:
            ok, value = _receive(worker.stdout)
        except (EOFError, pickle.UnpicklingError, ValueError) as exc:
            raise self._died(worker) from exc
        self._in_flight -= 1
        if not ok:
            raise value
        return value

    def _died(self, worker: subprocess.Popen) -> WorkerError:
        try:
            code = worker.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        how = f"exit code {code}"
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                how = f"killed by {signal.Signals(-code).name}" + (
                    ", which is what the out-of-memory killer sends" if code == -signal.SIGKILL else ""
                )
        return WorkerError(f"a worker process (pid {worker.pid}) stopped answering ({how}); see its messages above")

    @property
    def pids(self) -> list[int]:
        return [worker.pid for worker in self._workers]

    @property
    def idle(self) -> bool:
        """Whether every item sent was answered and the workers still run: the pool can serve another map."""
        return self._in_flight == 0 and not self._mixed and bool(self._workers) and all(w.poll() is None for w in self._workers)

    def close(self) -> None:
        for worker in self._workers:
            for stream in (worker.stdin, worker.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
        for worker in self._workers:
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        self._workers = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_DONE = object()


# --- pools kept for a run ---------------------------------------------------------------------
# A stage that runs once per chunk (quality), or a step run once per input file in a process of
# its own (a flow's ingest), would start its worker processes again each time: 0.3 s of wall
# time and half a CPU-second of imports for two workers, twenty times in a 1M-conversation run.
# Inside reusing(), pool() hands a pool that answered all its items back to the next caller
# with the same arguments; the outermost block closes what is left. A caller that finds none of
# its own kind takes an idle pool of another kind with as many workers and switches it
# (WorkerPool.switch): a run's signature workers, done when ingest is, become its quality workers,
# and the next stage starts no processes (half a CPU-second of imports each).
_IDLE: dict[tuple, list[WorkerPool]] = {}
_REUSING = 0
_IDLE_LOCK = threading.Lock()


@contextlib.contextmanager
def reusing() -> Iterator[None]:
    """Within this block (on any thread), :func:`pool` keeps finished pools for the next caller
    with the same arguments instead of closing them; the outermost block closes them."""
    global _REUSING
    with _IDLE_LOCK:
        _REUSING += 1
    try:
        yield
    finally:
        with _IDLE_LOCK:
            _REUSING -= 1
            closing = [p for pools in _IDLE.values() for p in pools] if _REUSING == 0 else []
            if _REUSING == 0:
                _IDLE.clear()
        for worker_pool in closing:
            worker_pool.close()


def close_idle(task: str) -> None:
    """Close the idle pools whose workers run ``task``: a step done with them (a flow's ingest,
    its inputs all in) lets them go rather than leave them to wait beside the next stage's."""
    with _IDLE_LOCK:
        closing = [p for k in [k for k in _IDLE if k[1] == task] for p in _IDLE.pop(k)]
    for worker_pool in closing:
        worker_pool.close()


def _take_other_kind(key: tuple, at_least: int | None = None) -> WorkerPool | None:
    """An idle pool of another kind than ``key``'s, with ``key``'s number of workers (or, with
    ``at_least``, the fewest of that many or more), switched to ``key``'s initializer and task;
    None when there is none (or it turned out dead). Called with ``_IDLE_LOCK`` not held."""
    with _IDLE_LOCK:
        fitting = [
            k
            for k, pools in _IDLE.items()
            if pools and k[:3] != key[:3] and (k[3] == key[3] or (at_least is not None and k[3] >= at_least))
        ]
        other = min(fitting, key=lambda k: (k[3] != key[3], k[3]), default=None)
        found = _IDLE[other].pop() if other is not None else None
    if found is None:
        return None
    try:
        if not found.idle:  # a worker died while the pool waited
            raise WorkerError("a worker of an idle pool died")
        found.switch(*key[:3])
    except (WorkerError, OSError):
        found.close()
        return None
    return found


def start(initializer: str | None, task: str, init_args: tuple, num_proc: int) -> None:
    """Inside :func:`reusing`: start a pool now and keep it idle for a later :func:`pool` with the
    same arguments, so that its workers import and initialise while the caller works on (a
    step on one core); an idle pool of another kind with as many workers or more is switched to
    these arguments instead. Outside it, or with such a pool already idle, nothing."""
    key = (initializer, task, init_args, max(1, num_proc))
    with _IDLE_LOCK:
        if _REUSING == 0 or _IDLE.get(key):
            return
    # returns at once either way: the workers initialise on their own (a bigger idle pool will
    # do: a stage asks for its workers with at_least)
    started = _take_other_kind(key, at_least=key[3]) or WorkerPool(*key)
    key = (*key[:3], len(started.pids))
    with _IDLE_LOCK:
        if _REUSING > 0:
            _IDLE.setdefault(key, []).append(started)
            return
    started.close()  # the block ended meanwhile


@contextlib.contextmanager
def pool(
    initializer: str | None, task: str, init_args: tuple, num_proc: int, *, at_least: int | None = None, keep_new: bool = True
) -> Iterator[WorkerPool]:
    """A :class:`WorkerPool` for the block: inside :func:`reusing`, one a block with the same
    arguments left idle (its workers initialised once), and handed back when the block ends
    with every item answered; otherwise a new one of ``num_proc`` workers, closed when the block
    ends. A pool whose block raised, or left items unanswered, is closed, never handed on.

    ``at_least``: an idle pool of these workers with that many or more will do too (a stage
    whose chunks differ in size takes the workers started for the first; dedup's keep policy,
    asking once, takes whatever the quality stage left). ``keep_new=False``: a pool started
    here is closed when the block ends, never kept beside the one a later step starts. With
    none of these workers idle, an idle pool of another kind is switched to them (see above)."""
    key = (initializer, task, init_args, max(1, num_proc))
    with _IDLE_LOCK:
        found_key = key if _IDLE.get(key) else None
        if found_key is None and at_least is not None:  # the smallest idle pool of these workers that is big enough
            big_enough = [k for k, pools in _IDLE.items() if pools and k[:3] == key[:3] and k[3] >= at_least]
            found_key = min(big_enough, key=lambda k: k[3], default=None)
        found = _IDLE[found_key].pop() if found_key is not None else None
    if found is not None and not found.idle:  # a worker died while the pool waited (killed, out of memory)
        found.close()
        found = None
    if found is None and (switched := _take_other_kind(key, at_least)) is not None:
        found, found_key = switched, (*key[:3], len(switched.pids))
    if found is not None:
        worker_pool, key, keepable = found, found_key, True
    else:
        worker_pool, keepable = WorkerPool(*key), keep_new
    reusable = False
    try:
        yield worker_pool
        reusable = worker_pool.idle
    finally:
        with _IDLE_LOCK:
            keep = keepable and reusable and _REUSING > 0
            if keep:
                _IDLE.setdefault(key, []).append(worker_pool)
        if not keep:
            worker_pool.close()


def main() -> None:
    """The worker: initialise, then answer items until the caller closes stdin."""
    arrow_without_pandas()
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    switch = importlib.import_module("pipeline.workers")._Switch  # as the caller pickles it (this module is __main__)
    sys.stdout = sys.stderr  # a stray print must not corrupt the answers
    initializer, task, init_args = _receive(requests)
    if initializer is not None:
        _resolve(initializer)(*init_args)
    apply = _resolve(task)
    while True:
        try:
            item = _receive(requests)
        except EOFError:
            # Every answer is sent and every file a step wrote is closed: leave without the
            # interpreter's teardown, which with torch or transformers imported takes most of a
            # second that the caller, waiting in close(), would spend too.
            sys.stderr.flush()
            os._exit(0)
        try:
            if type(item) is switch:
                if item.initializer is not None:
                    _resolve(item.initializer)(*item.init_args)
                apply = _resolve(item.task)
                answer = (True, None)
            else:
                answer = (True, apply(item))
        except Exception as exc:  # raised again in the caller, with its type
            try:
                pickle.dumps(exc)
            except Exception:
                exc = RuntimeError(f"{type(exc).__name__}: {exc}")
            answer = (False, exc)
        _send(answers, answer)


if __name__ == "__main__":
    main()
