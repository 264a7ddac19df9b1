"""The one atomic writer: a temporary file in the destination's folder, fsynced, then ``os.replace``.

A crash or an exception never leaves a half-written file at the destination, and readers see either the
old file or the new one. Everything the package writes goes through here: ``atomic_write`` (and its text,
bytes, JSON and CSV forms), ``write_temp`` where several files are moved into place together (weights and
their sidecar), ``atomic_link`` to publish an existing file under another name, ``staged_output`` for a
directory of files that appear together. The run lock is ``vitscope.io.lock``.
"""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any


def file_mode(mode: int = 0o666) -> int:
    """``mode`` less the process' umask: the permissions ``open()`` would give a new file (``mkstemp`` and
    ``mkdtemp`` make 0600 / 0700 ones)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mode & ~mask


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (renames into it) to disk, where the file system can."""
    with contextlib.suppress(OSError):  # not every file system can fsync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_quietly(path: str | os.PathLike) -> None:
    """Remove a file if it is there (a temporary file after an error)."""
    with contextlib.suppress(OSError):
        os.unlink(path)


def write_temp(path: str | os.PathLike, write: Callable[[str], None]) -> str:
    """Call ``write(tmp)`` on a temporary file next to ``path``, give it ``open()``'s permissions and fsync it;
    return the temporary path, for the caller to ``os.replace`` onto ``path`` (removed here on an error)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        fsync_file(tmp)
    except BaseException:
        remove_quietly(tmp)
        raise
    return tmp


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, fsync it, then move it to ``path``."""
    path = Path(path)
    tmp = write_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    return path


def atomic_link(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Make ``dst`` the file ``src`` (a hard link, else a fsynced copy) in one rename."""
    dst = Path(dst)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.unlink(tmp)
        try:
            os.link(src, tmp)
        except OSError:  # no hard links on this file system: copy
            shutil.copyfile(src, tmp)
            fsync_file(tmp)
        os.replace(tmp, dst)
    except BaseException:
        remove_quietly(tmp)
        raise
    return dst


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def json_safe(obj: Any) -> Any:
    """A copy of ``obj`` that strict JSON accepts: non-finite floats become None (JSON has no NaN/Infinity),
    tensors and numpy values become lists or numbers, paths and dict keys become strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "detach"):  # torch tensors
        obj = obj.detach().cpu()
    if hasattr(obj, "tolist"):  # tensors, numpy arrays and scalars
        return json_safe(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> Path:
    """Write ``obj`` as strict JSON (no NaN or Infinity: convert them to None first) atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, allow_nan=False))


def write_csv(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    """Rows as CSV, atomically; list values (per-head values, curves) become columns ``key_0, key_1, ...``.

    Columns are the union of the rows' keys in first-seen order; missing cells are empty.
    """
    flat = []
    for row in rows:
        r: dict[str, Any] = {}
        for k, v in row.items():
            if isinstance(v, (list, tuple)):
                r.update({f"{k}_{i}": x for i, x in enumerate(v)})
            else:
                r[k] = v
        flat.append(r)
    columns: list[str] = []
    for r in flat:
        columns += [k for k in r if k not in columns]

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(flat)

    return atomic_write(path, write)


INCOMPLETE_MARKER = ".vitscope-incomplete"  # present in an output directory while files are moved into it


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Staging folders of ``out`` left by killed processes (``.NAME.partial-PID-*`` whose PID is gone)."""
    prefix = f".{out.name}.partial-"
    for entry in out.parent.glob(prefix + "*"):
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _move_into(src: Path, dst: Path) -> None:
    for entry in sorted(src.iterdir()):
        target = dst / entry.name
        if entry.is_dir() and target.is_dir():
            _move_into(entry, target)
        else:
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)


@contextlib.contextmanager
def staged_output(out: str | os.PathLike) -> Iterator[Path]:
    """A hidden staging folder next to ``out`` that becomes ``out`` when the block ends without an error.

    A new (or empty) ``out`` appears complete in one rename, or not at all. Into an ``out`` that already holds
    files (e.g. earlier results), the new files are moved one by one with ``INCOMPLETE_MARKER`` present
    until the last is in place, so a reader (``vitscope report``) can tell a directory a kill cut short.
    On an error the staging folder is removed; one left by a killed process is removed by the next call.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-{os.getpid()}-"))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    os.chmod(stage, file_mode(0o777))  # mkdtemp makes 0700 folders
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.rename(stage, out)
        return
    marker = out / INCOMPLETE_MARKER
    atomic_write_text(marker, f"vitscope is moving files into this directory from {stage.name}\n")
    _move_into(stage, out)
    shutil.rmtree(stage, ignore_errors=True)
    os.remove(marker)
