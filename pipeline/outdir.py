"""The output folder: sftkit's only if it says so, one run at a time, and it deletes only what it wrote.

Three files of sftkit's own sit in every output folder ``DIR``:

* ``DIR/.sftkit`` -- the marker (JSON: ``created_at``, ``sftkit_version``), written on first use.
  A folder that is not empty and has neither the marker nor a ``manifest.json`` is refused: it
  is someone else's. A folder that an older sftkit made (a manifest, no marker) is adopted.
* ``DIR/.sftkit.lock`` -- an advisory ``flock`` held for a whole run (:func:`hold`). A second run
  into the same folder fails at once, naming the holder (its pid and start time, which the
  holder writes into the file after locking). The OS drops the lock when its process dies, so a
  lock file a killed run left behind is simply taken over.
* ``DIR/.sftkit-files`` -- the journal: the relative path of every file sftkit writes in ``DIR``,
  appended (and fsynced) *before* the file is created (:func:`will_write`, called by
  ``pipeline.fsutil``'s writers). sftkit deletes a file only if the journal lists it (plus its own
  ``.work/`` folder and ``.tmp-*`` temporaries); a user's ``shards/notes.txt`` or
  ``shards/my-own.parquet`` survives refreshes and rebuilds.

Writing errors that are the folder's and not the program's (disk full, no permission, a read-only
file system) become one sentence naming the folder (:func:`write_error`), not a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from datetime import UTC
from pathlib import Path

log = logging.getLogger("sftkit.outdir")

MARKER = ".sftkit"
LOCK = ".sftkit.lock"
JOURNAL = ".sftkit-files"
OWN_FILES = frozenset({MARKER, LOCK, JOURNAL})
WORK = ".work"
MANIFEST = "manifest.json"  # pipeline.manifest.MANIFEST_NAME (that module imports this one's writers)
PREVIOUS_MANIFEST = "manifest.previous.json"
# How far above a written file its output folder can be (DIR/dedup_index/.tmp-dedup-x/sig.parquet).
_ROOT_SEARCH_DEPTH = 4

_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NO_PERMISSION = {errno.EACCES, errno.EPERM}
FOLDER_ERRNOS = frozenset(_DISK_FULL | _NO_PERMISSION | {errno.EROFS})


class FolderBusy(ValueError):
    """Another sftkit run holds the folder's lock."""


class NotAnSftkitFolder(ValueError):
    """The folder holds files that sftkit did not make."""


def sftkit_version() -> str:
    try:
        from importlib.metadata import version

        return version("sftkit")
    except Exception:  # noqa: BLE001 - a source checkout without metadata
        return "unknown"


def _now_iso() -> str:
    from datetime import datetime

    return datetime.now(UTC).replace(microsecond=0).isoformat()


# --- whose folder is it ----------------------------------------------------------------------
def is_sftkit_folder(root: str | os.PathLike) -> bool:
    root = Path(root)
    return (root / MARKER).is_file() or (root / MANIFEST).is_file()


def check_usable(root: str | os.PathLike) -> None:
    """Refuse a path that is a file, or a non-empty folder sftkit did not make."""
    root = Path(root)
    if not root.exists():
        return
    if not root.is_dir():
        raise NotAnSftkitFolder(f"{root} is a file, not a folder: choose an empty or new folder for the output")
    if is_sftkit_folder(root):
        return
    try:
        foreign = [p.name for p in root.iterdir() if p.name not in OWN_FILES]
    except OSError as exc:
        raise _as_value_error(exc, root) from exc
    if foreign:
        raise NotAnSftkitFolder(f"{root} is not empty and was not made by sftkit: choose an empty or new folder")


def claim(root: str | os.PathLike) -> None:
    """Make ``root`` sftkit's (marker and journal), or refuse it; idempotent.

    A folder an older sftkit made (a manifest, no marker) is adopted: the files its manifests list
    are entered in the journal, since sftkit wrote those; anything else in it is left alone.
    """
    root = Path(root)
    check_usable(root)
    with writing_to(root):
        root.mkdir(parents=True, exist_ok=True)
        marker, journal = root / MARKER, root / JOURNAL
        if marker.is_file() and journal.is_file():
            return
        listed = _listed_in_manifests(root)
        if listed:
            log.info("adopting %s: %d file(s) its manifest lists are sftkit's", root, len(listed))
        for relative in listed:
            record(root, relative)
        if not journal.exists():
            _append(journal, "")  # an empty journal: "sftkit wrote nothing here yet"
        if not marker.is_file():
            _write_json(marker, {"created_at": _now_iso(), "sftkit_version": sftkit_version()})


def _listed_in_manifests(root: Path) -> list[str]:
    listed: list[str] = []
    for name in (MANIFEST, PREVIOUS_MANIFEST):
        path = root / name
        if not path.is_file():
            continue
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        listed.append(name)
        if isinstance(manifest, dict):
            from pipeline.manifest import listed_files

            listed += sorted(listed_files(manifest))
    return listed


# --- one run at a time -----------------------------------------------------------------------
@contextlib.contextmanager
def hold(root: str | os.PathLike, what: str = "sftkit prepare") -> Iterator[Path]:
    """Hold ``root``'s lock for the block; make the folder sftkit's first (or refuse it).

    Fails at once with :class:`FolderBusy` when another process holds it. Inside the block, an
    ``OSError`` that is the folder's fault (disk full, no permission, read-only) becomes a
    ``ValueError`` naming the folder.
    """
    root = Path(root)
    check_usable(root)  # before anything is created in a folder that may not be ours
    with writing_to(root):
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            fd = -1
            raise FolderBusy(f"another {_holder(root / LOCK)} is writing {root}; wait for it to finish") from None
        except (ImportError, OSError) as exc:  # a file system without flock (some network mounts)
            log.warning("cannot lock %s (%s): nothing stops two runs writing it at once", root, exc)
        with writing_to(root):
            info = json.dumps({"pid": os.getpid(), "started_at": _now_iso(), "host": socket.gethostname(), "what": what})
            os.ftruncate(fd, 0)
            os.pwrite(fd, (info + "\n").encode(), 0)
            os.fsync(fd)
        claim(root)
        with writing_to(root):
            yield root
    finally:
        if fd >= 0:  # ours: no live holder now, so the file says nothing; closing drops the flock
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)


def check_free(root: str | os.PathLike) -> None:
    """Fail now, creating nothing, if ``root`` is someone else's folder or another run holds it.

    For callers that would otherwise start something slow (a workflow engine) before :func:`hold`;
    :func:`hold` itself is what keeps two runs apart.
    """
    root = Path(root)
    check_usable(root)
    try:
        fd = os.open(root / LOCK, os.O_RDWR)
    except OSError:
        return  # no lock file (or none we can open): hold() will say what is wrong
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise FolderBusy(f"another {_holder(root / LOCK)} is writing {root}; wait for it to finish") from None
    except (ImportError, OSError):
        pass
    finally:
        os.close(fd)  # closing drops the probe's lock


def _holder(lock: Path) -> str:
    """'sftkit prepare (pid N, started T)' from the lock file (the holder writes it just after locking)."""
    info: dict = {}
    for _ in range(20):
        try:
            info = json.loads(lock.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            info = {}
        if info:
            break
        time.sleep(0.05)
    host = info.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    return f"{info.get('what', 'sftkit prepare')} (pid {info.get('pid', 'unknown')}{where}, started {info.get('started_at', 'at an unknown time')})"


# --- the journal -----------------------------------------------------------------------------
def find_root(path: str | os.PathLike) -> Path | None:
    """The sftkit output folder ``path`` lies in (the nearest folder above it with a marker)."""
    folder = Path(path).absolute().parent
    for _ in range(_ROOT_SEARCH_DEPTH):
        if (folder / MARKER).is_file():
            return folder
        if folder.parent == folder:
            break
        folder = folder.parent
    return None


def will_write(path: str | os.PathLike) -> None:
    """Enter ``path`` in its output folder's journal before it is created (a no-op outside one).

    ``.work/`` and sftkit's own bookkeeping files are not entered: ``.work/`` is removed whole.
    """
    root = find_root(path)
    if root is None:
        return
    relative = Path(path).absolute().relative_to(root).as_posix()
    if relative.split("/")[0] == WORK or relative in OWN_FILES:
        return
    if os.path.lexists(path) and relative not in written(root):
        raise ValueError(
            f"{path} is in the way: sftkit writes a file of that name there, and this one is not sftkit's; move it out of {root}"
        )
    record(root, relative)


def record(root: str | os.PathLike, relative: str) -> None:
    _append(Path(root) / JOURNAL, relative + "\n")


def written(root: str | os.PathLike) -> set[str]:
    """Relative paths of the files sftkit wrote in ``root`` (some may since have gone)."""
    path = Path(root) / JOURNAL
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return set()
    return {line for line in text.splitlines() if line}


def remove(root: str | os.PathLike, relatives: Iterable[str]) -> list[str]:
    """Delete those of ``relatives`` that sftkit wrote (the journal lists them) and that exist.

    Anything the journal does not list is left alone, whatever its name. Returns what went.
    """
    root = Path(root)
    ours = written(root)
    removed = []
    resolved_root = root.resolve()
    for relative in sorted(set(relatives)):
        if relative not in ours or relative in OWN_FILES:
            continue
        path = root / relative
        if resolved_root not in path.resolve().parents or not (path.is_file() or path.is_symlink()):
            continue
        with writing_to(root):
            path.unlink()
        removed.append(relative)
    if removed:
        log.info("removed %d file(s) sftkit wrote in %s and no manifest lists: %s", len(removed), root, ", ".join(removed))
    return removed


def compact(root: str | os.PathLike) -> None:
    """Rewrite the journal with only the files that still exist (end of a run, lock held)."""
    root = Path(root)
    journal = root / JOURNAL
    if not journal.exists():
        return
    keep = sorted(r for r in written(root) if (root / r).exists())
    tmp = root / f"{JOURNAL}.tmp"
    with writing_to(root):
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("".join(f"{r}\n" for r in keep))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, journal)


def remove_work(root: str | os.PathLike) -> None:
    shutil.rmtree(Path(root) / WORK, ignore_errors=True)


def _append(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if text:
            os.write(fd, text.encode("utf-8"))  # one short write with O_APPEND: lines never interleave
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, indent=2) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# --- a full disk, a folder one may not write -------------------------------------------------
def write_error(exc: BaseException, path: str | os.PathLike, *, is_folder: bool = False) -> ValueError | None:
    """The ``ValueError`` to raise for ``exc`` met writing ``path`` (a file, or the output folder
    itself with ``is_folder``), or None if the error is not the folder's.

    Disk full (with the free space left there), no permission and a read-only file system are the
    folder's; an error about some other file (an input that cannot be read) is not.
    """
    if not isinstance(exc, OSError) or exc.errno not in FOLDER_ERRNOS:
        return None
    path = Path(path).absolute()
    folder = path if is_folder else (find_root(path) or path.parent)
    if exc.errno in _NO_PERMISSION:  # the folder's only if the error is about it, not an input file
        filename = getattr(exc, "filename", None)
        if filename is None:
            if str(folder) not in str(exc):
                return None
        else:
            target = Path(os.fsdecode(filename)).absolute()
            if target != folder and folder not in target.parents and target not in folder.parents:
                return None
    return _as_value_error(exc, folder)


def _as_value_error(exc: OSError, folder: Path) -> ValueError:
    if exc.errno in _DISK_FULL:
        return ValueError(
            f"cannot write to {folder}: the disk is full ({_free_space(folder)} free there); "
            "free some space or choose another output folder"
        )
    if exc.errno == errno.EROFS:
        return ValueError(f"cannot write to {folder}: it is on a read-only file system; choose another output folder")
    if exc.errno in _NO_PERMISSION:
        return ValueError(f"cannot write to {folder}: permission denied; choose a folder you can write to")
    return ValueError(f"cannot write to {folder}: {exc.strerror or exc}")


def _free_space(folder: Path) -> str:
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return "an unknown amount"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit}" if unit == "bytes" else f"{free:.1f} {unit}"
        free /= 1024
    return f"{free:.1f} TiB"


@contextlib.contextmanager
def writing_to(path: str | os.PathLike) -> Iterator[None]:
    """Turn a disk-full / no-permission / read-only ``OSError`` met writing the output folder
    ``path`` in the block into a ``ValueError`` naming it."""
    try:
        yield
    except OSError as exc:
        error = write_error(exc, path, is_folder=True)
        if error is None:
            raise
        raise error from exc
