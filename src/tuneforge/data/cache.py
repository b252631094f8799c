"""The prepared-data cache: a key from everything that determines the rows, a lock, atomic publication.

A cache entry is a directory ``<cache_dir>/<key>/`` holding Arrow files and ``meta.json``. It is built in a
temporary sibling (``.build-<key>-<pid>-<random>``) and published with one ``os.rename``: an entry that exists is
complete, a killed build leaves only a temporary directory (removed by the next builder of that key), and two
builders of the same key serialise on ``<key>.lock`` (``fcntl.flock``: released by the kernel however the holder
exits) — the second one finds the first one's entry and reuses it.

The key hashes (see :func:`data_fingerprint`): the data files' contents (size, mtime and a SHA-256 of the whole
file, or of 16 spread 1 MiB samples for files over 256 MiB), the data settings that change rows (cleaning, format,
max length, packing, system prompt, mixing, task settings, eval split), the stage, the seed where it changes the
rows, the tokenizer (its serialized ``tokenizer.json`` and special tokens), the chat template, and the source of the
data modules themselves (a code change rebuilds).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuneforge.errors import UserError

#: bump when the layout of a cache entry changes
FORMAT_VERSION = 1
#: files larger than this are hashed from samples (size + mtime + 16 samples of 1 MiB)
FULL_HASH_LIMIT = 256 * 2**20
_SAMPLES, _SAMPLE_SIZE = 16, 2**20
#: modules whose code decides the rows
_CODE = ("readers.py", "clean.py", "templates.py", "tokenize.py", "packing.py", "build.py", "mix.py",
         "preference.py", "prepared.py", "cache.py")


def default_cache_dir() -> Path:
    """``$TUNEFORGE_DATA_CACHE``, else ``$TUNEFORGE_CACHE/data`` (default ``~/.cache/tuneforge/data``)."""
    if os.environ.get("TUNEFORGE_DATA_CACHE"):
        return Path(os.environ["TUNEFORGE_DATA_CACHE"])
    root = os.environ.get("TUNEFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tuneforge")
    return Path(root) / "data"


def file_digest(path: Path) -> dict[str, Any]:
    """Size, mtime and a content hash of one file (sampled for files over :data:`FULL_HASH_LIMIT`)."""
    st = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if st.st_size <= FULL_HASH_LIMIT:
            for block in iter(lambda: handle.read(4 * 2**20), b""):
                digest.update(block)
            how = "sha256"
        else:
            step = (st.st_size - _SAMPLE_SIZE) // (_SAMPLES - 1)
            for k in range(_SAMPLES):
                handle.seek(k * step)
                digest.update(handle.read(_SAMPLE_SIZE))
            how = "sampled-sha256"
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, how: digest.hexdigest()}


def source_digest(spec: str) -> Any:
    """What a data source contributes to the key: its files' digests, or its name (hub / built-in corpus)."""
    p = Path(spec)
    if p.is_dir():
        from tuneforge.data.readers import FILE_SUFFIXES

        return [file_digest(f) for f in sorted(p.iterdir()) if f.is_file() and f.suffix.lower() in FILE_SUFFIXES]
    if p.is_file():
        return file_digest(p)
    return {"name": spec}  # a hub dataset or a built-in corpus: named, not hashed (see docs/data.md)


def tokenizer_digest(tokenizer: Any) -> str:
    """A hash of the tokenizer: its serialized fast tokenizer (``tokenizer.json``) plus special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(getattr(tokenizer, "get_vocab", lambda: {})())
    extra = {
        "class": type(tokenizer).__name__,
        "special": {k: str(v) for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items()},
        "eos": getattr(tokenizer, "eos_token_id", None),
        "name": getattr(tokenizer, "name_or_path", None),
    }
    return hashlib.sha256((body + json.dumps(extra, sort_keys=True, default=str)).encode("utf-8")).hexdigest()


def code_digest() -> str:
    """A hash of the data modules' source (a change in how rows are made invalidates every entry)."""
    here = Path(__file__).parent
    digest = hashlib.sha256(str(FORMAT_VERSION).encode())
    for name in _CODE:
        path = here / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def data_fingerprint(parts: dict[str, Any]) -> str:
    """The cache key: a SHA-256 of ``parts`` (JSON, sorted keys), shortened to 24 hex digits."""
    text = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


class Entry:
    """One cache entry: ``path`` (published, complete) or a build of it under a lock."""

    def __init__(self, root: Path, key: str):
        self.root = Path(root)
        self.key = key
        self.path = self.root / key

    def ready(self) -> bool:
        """True when the entry is published (a complete build)."""
        meta = self.path / "meta.json"
        if not meta.is_file():
            return False
        try:
            return bool(json.loads(meta.read_text(encoding="utf-8")).get("complete"))
        except (OSError, json.JSONDecodeError):
            return False

    def meta(self) -> dict:
        """The published ``meta.json``."""
        return json.loads((self.path / "meta.json").read_text(encoding="utf-8"))

    @contextlib.contextmanager
    def lock(self, wait_message=None, poll: float = 0.5) -> Iterator[None]:
        """Hold ``<key>.lock`` (waiting for another builder; ``wait_message()`` is called once if we wait)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: unlocked
            yield
            return
        from tuneforge.utils import try_flock

        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"data.cache_dir {self.root}: cannot create it ({exc}); give a writable directory "
                            "with --cache-dir or data.cache_dir") from None
        fd = os.open(self.root / f"{self.key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            told = False
            while not try_flock(fd):
                if not told and wait_message is not None:
                    wait_message()
                    told = True
                time.sleep(poll)
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def new_build_dir(self) -> Path:
        """A fresh temporary directory beside the entry (stale ones of this key removed: we hold the lock)."""
        for stale in self.root.glob(f".build-{self.key}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        folder = self.root / f".build-{self.key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        return folder

    def publish(self, build_dir: Path, meta: dict) -> None:
        """Write ``meta.json`` (complete), fsync, and rename the build directory to the entry (atomic)."""
        meta = {**meta, "complete": True, "key": self.key, "format": FORMAT_VERSION}
        with open(build_dir / "meta.json", "w", encoding="utf-8") as handle:
            json.dump(meta, handle, ensure_ascii=False, indent=1, default=str)
            handle.flush()
            os.fsync(handle.fileno())
        for f in build_dir.iterdir():  # the Arrow files are on disk before the entry becomes visible
            if f.is_file():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
        if self.path.exists():  # an incomplete leftover (pre-rename crash cannot make one; a manual copy can)
            shutil.rmtree(self.path, ignore_errors=True)
        os.rename(build_dir, self.path)
        with contextlib.suppress(OSError):
            dir_fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
