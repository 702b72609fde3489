"""A time limit for Python code that cannot be asked to stop: a chat template rendering.

A chat template is a program from the model's author (or the user's config). Jinja's sandbox
keeps it from reaching the machine, not from looping: ``{% for i in range(99999) %}{% for j in
range(99999) %}`` renders for hours. Rendering runs on sftkit's own threads (Prefect runs tasks
in worker threads, where signals cannot reach), so the limit is kept by one watchdog thread per
process that raises :class:`RenderTimeout` inside the overrunning thread with
``PyThreadState_SetAsyncExc``: the exception surfaces at the next Python bytecode of the render,
which is compiled Jinja, so a loop stops within a few milliseconds of its deadline. (A single
C-level operation, such as one enormous string repetition, is not interrupted; the output size
limit in :func:`pipeline.templates.render` bounds what such a template can build up by loops.)

The exception is only ever raised while the thread is inside :func:`time_limit`: the watchdog
fires under the same lock that the thread takes to leave, and an exception that lost the race
(fired as the block was finishing) is taken before the thread leaves.
"""

from __future__ import annotations

import ctypes
import threading
import time


class RenderTimeout(BaseException):
    """Raised inside a thread whose time limit ran out (a BaseException, so that the ``except
    Exception`` around a template's own errors does not take it for one)."""


_lock = threading.Lock()
_deadlines: dict[int, float] = {}  # thread id -> monotonic deadline
_watchdog: threading.Thread | None = None
_FIRED = float("inf")
_POLL = 0.05  # seconds between the watchdog's looks: a render stops at most this late
_IDLE = 30.0  # a watchdog with nothing to watch this long ends; the next limit starts another
_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
_set_async_exc.argtypes = (ctypes.c_ulong, ctypes.py_object)


class time_limit:
    """Raise :class:`RenderTimeout` in this thread if the ``with`` block runs longer than ``seconds``.

    Nested limits: the outer one holds. A class, not a generator: the exception can land at any
    bytecode, also in ``__exit__`` before it has removed the entry; an entry that already fired
    is therefore never taken for an outer limit (it is a leftover), and :func:`release` (called
    from ``__exit__``, and safe to call again) clears it.
    """

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.owner = False

    def __enter__(self) -> time_limit:
        if self.seconds is None or self.seconds <= 0:
            return self
        thread = threading.get_ident()
        global _watchdog
        with _lock:
            if _deadlines.get(thread, _FIRED) is not _FIRED:
                return self  # inside an outer limit, which holds
            _deadlines[thread] = time.monotonic() + self.seconds
            self.owner = True
            if _watchdog is None or not _watchdog.is_alive():
                _watchdog = threading.Thread(target=_watch, name="sftkit-render-watchdog", daemon=True)
                _watchdog.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.owner:
            self.owner = False
            fired = release()
            if fired and exc_type is not RenderTimeout:
                # The watchdog fired as the block was finishing: the exception is pending and
                # surfaces at the next bytecode check; take it here, inside the limit, rather
                # than in the caller's later code. (Clearing it with SetAsyncExc(NULL) instead
                # would leave the interpreter's eval breaker set, slowing every later line.)
                try:
                    for _ in range(10_000_000):
                        pass
                except RenderTimeout:
                    pass
                raise RenderTimeout
        return False


def release() -> bool:
    """Drop this thread's limit; whether the watchdog had fired it. Safe to call twice."""
    with _lock:
        return _deadlines.pop(threading.get_ident(), None) is _FIRED


def _watch() -> None:
    global _watchdog
    idle_since = time.monotonic()
    while True:
        time.sleep(_POLL)
        now = time.monotonic()
        with _lock:
            if _deadlines:
                idle_since = now
            elif now - idle_since > _IDLE:
                _watchdog = None
                return
            for thread, deadline in _deadlines.items():
                if deadline <= now:
                    _set_async_exc(thread, ctypes.py_object(RenderTimeout))
                    _deadlines[thread] = _FIRED  # once; the thread is on its way out
