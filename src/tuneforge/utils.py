"""Small shared helpers: atomic writes, output-directory guards, run locks, SIGTERM cleanup, JSON lines."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tuneforge.errors import UserError


class Terminated(SystemExit):
    """Raised by our SIGTERM handler so that ``finally``/``except BaseException`` blocks clean up.

    The default SIGTERM action kills the process at once and leaves temporary directories behind; as a
    ``SystemExit`` subclass this exits with the conventional code 143 (128 + SIGTERM) and no traceback.
    """

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def raise_terminated(signum, frame) -> None:
    """A SIGTERM handler: raise :class:`Terminated`."""
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` instead of killing the process outright.

    Only the main thread can install handlers, and a handler someone else installed (e.g. the training loop's
    save-and-stop one) is left in place: then this is a no-op.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGTERM/SIGINT back for a few renames that must not be cut in half; delivered right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)  # the portable way reads it by setting it; restore at once
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half of it.

    The file gets the permissions a plain ``open(path, "w")`` would give (``0o666`` minus the umask), and it is
    on disk (fsync) when this returns.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp creates 0600: other readers of the run would be locked out
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | Path, data: Any) -> None:
    """Atomically write ``data`` as indented JSON."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def fsync_dir(path: str | Path) -> None:
    """Flush a directory entry (a rename or a new file in it) to disk; a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """Flush every file and directory under ``path`` to disk (before a marker says the tree is complete)."""
    root = Path(path)
    for folder, _, files in os.walk(root):
        for name in files:
            file = Path(folder) / name
            if file.is_symlink():
                continue
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(folder)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a new temporary sibling directory; on success it takes the place of ``path`` in one rename.

    Whatever was at ``path`` is replaced only after the block succeeded, and nothing but ``path`` itself is ever
    removed (the old copy is renamed to a fresh unique name first). A crash, an exception or SIGTERM inside the
    block leaves ``path`` as it was and removes the temporary directory. Whether ``path`` may be replaced at all
    is the caller's decision: check it first with :func:`prepare_output`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with sigterm_raises():
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        try:
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700
            yield tmp
            with signals_deferred():
                if path.exists() or path.is_symlink():
                    old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.old")
                    os.rename(path, old)
                    try:
                        os.rename(tmp, path)
                    except BaseException:
                        os.rename(old, path)
                        raise
                    fsync_dir(path.parent)
                    _remove(old)
                else:
                    os.rename(tmp, path)
                    fsync_dir(path.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def prepare_output(out: str | Path, inputs: Iterable[str | Path | None], force: bool = False,
                   option: str = "--out") -> Path:
    """Check that ``out`` may be (re)written by a command reading ``inputs``; return it as given.

    Compared as resolved real paths (symlinks, ``..`` and ``~`` followed): ``out`` must not equal, contain or lie
    inside any input that exists (a run, its ``final/``, its base, a recipe and its models; hub ids and missing
    paths cannot be harmed and are skipped), nor contain the current directory. An existing ``out`` that is a
    file or a non-empty directory is replaced only with ``force``; the replacement itself happens later, in one
    rename, through :func:`atomic_dir`.

    Raises:
        UserError: naming the input ``out`` collides with, or the existing output and ``--force``.
    """
    out_path = Path(out)
    target = _real(out_path)
    for given in inputs:
        if given is None or str(given) == "" or not os.path.lexists(os.path.expanduser(str(given))):
            continue
        source = _real(given)
        if _within(source, target):
            what = "is" if source == target else "contains"
            raise UserError(f"{option} {out}: {what} the input {given}; writing there would destroy it. "
                            "Choose a new directory for the output (nothing was written)")
        if _within(target, source):
            raise UserError(f"{option} {out}: lies inside the input {given}; writing there would change it. "
                            "Choose a directory outside it (nothing was written)")
    if _within(_real(os.getcwd()), target):
        raise UserError(f"{option} {out}: contains the current directory; choose a new directory for the output")
    if os.path.lexists(out_path):
        is_empty_dir = target.is_dir() and not out_path.is_symlink() and not any(target.iterdir())
        if not is_empty_dir and not force:
            kind = "directory" if target.is_dir() else "file"
            raise UserError(f"{option} {out}: an existing non-empty {kind}; pass --force to replace it "
                            "(it is replaced only after the new output is complete), or choose a new directory")
    return out_path


def try_flock(fd: int) -> bool:
    """Take an exclusive ``fcntl.flock`` on the open file ``fd`` without waiting: False when another process holds
    it. The kernel releases it when the file is closed or the process exits, however it exits. Where ``fcntl``
    does not exist (Windows) nothing is locked and the answer is True."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def exclusive_lock(lock_path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``lock_path`` for the block; refuse at once if another process has it.

    The lock is ``fcntl.flock`` on an open file: the kernel releases it when the process exits, however it exits
    (a crash or SIGKILL never leaves a stale lock). The file itself stays; it holds the owner's pid for the message.
    Where ``fcntl`` does not exist (Windows) the block runs unlocked.

    Raises:
        UserError: another process holds the lock (its pid named when known).
    """
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(lock_path), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not try_flock(fd):
            owner = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            raise UserError(f"{what} is in use by another tuneforge process{f' (pid {owner})' if owner else ''}; "
                            f"wait for it to finish or stop it (lock file {lock_path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def gc_frozen() -> Iterator[None]:
    """Run the block with every object that exists now moved out of the garbage collector's sight (``gc.freeze``).

    Why: a training process holds ~300k long-lived objects (torch, transformers, the tokenised data) that never
    become garbage, and each full collection walks them all — the Trainer's own ``gc.collect()`` at train start
    cost ~0.25 s here, and the automatic collections during training walk them again. Frozen, they are skipped;
    objects created inside the block are collected as usual. ``gc.unfreeze`` on the way out returns them.
    """
    import gc

    # No gc.collect() first: that full walk is the cost being avoided; garbage that exists now waits for unfreeze.
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON object as a line (flushed, so a crash loses at most this line)."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        handle.flush()


def read_jsonl(path: str | Path, strict: bool = True) -> list[tuple[int, dict]]:
    """THE JSON-lines reader for tuneforge's own files: ``(line number, object)`` per non-blank line.

    Args:
        path: the file (``UserError`` when it is missing).
        strict: a line that is not a JSON object raises a ``UserError`` naming ``file:line``; with ``False`` it is
            skipped (``metrics.jsonl`` may end in a line cut by a crash).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc})") from None
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if strict:
                raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            continue
        if isinstance(row, dict):
            rows.append((number, row))
        elif strict:
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
    return rows


def load_yaml(path: str | Path) -> Any:
    """THE YAML reader: the parsed document of ``path``; a file that does not parse raises a ``UserError`` naming
    ``file:line`` (missing files raise ``FileNotFoundError``; callers decide what absence means)."""
    import yaml

    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc})") from None


def lazy_exports(package: str, exports: dict[str, str]):
    """A module ``__getattr__`` that imports ``exports[name]`` (a module path) on first access.

    Packages use it so that ``import tuneforge.x`` stays cheap while ``tuneforge.x.func`` still works.
    """
    import importlib

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return __getattr__


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
               "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_size(text: str, option: str) -> int:
    """Bytes of a size written as ``16GB``, ``512MiB``, ``1.5 GiB`` or a plain byte count.

    Raises:
        UserError: naming ``option`` and the accepted forms.
    """
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise UserError(f"{option} {text!r}: write a positive size such as 16GB, 512MiB or 1.5GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def process_alive(pid: int | None) -> bool:
    """Whether process ``pid`` runs on this host; a zombie (exited, not yet reaped) counts as gone."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True
