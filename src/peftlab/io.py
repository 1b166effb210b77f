"""Writing files so that nothing written is lost: temp file or directory, fsync, rename.

A reader sees either the old complete version or the new complete version, never a torn one.
Directories carry a ``MANIFEST.json`` (file sizes and sha256) written last, so a copy that lost
files after the rename (a bad disk, a partial rsync) is detected on load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

MANIFEST = "MANIFEST.json"


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux: a umask set
    to 0 for a moment would apply to files another thread creates in that moment)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ordinary_permissions(path: str | Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; what we publish gets the usual mode."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        ordinary_permissions(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[str(p.relative_to(directory))] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    (directory / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def verify_manifest(directory: Path, deep: bool = True) -> str | None:
    """None when every file listed in the manifest is present and intact, else what is wrong.

    ``deep=False`` checks presence and sizes only (cheap, for rotation); ``deep=True`` also
    re-hashes every file (before anything is loaded from the directory).
    """
    directory = Path(directory)
    mpath = directory / MANIFEST
    if not mpath.is_file():
        return f"{directory}: no {MANIFEST} (the write did not finish)"
    try:
        files = json.loads(mpath.read_text(encoding="utf-8"))["files"]
        entries = [(str(rel), int(info["size"]), str(info["sha256"])) for rel, info in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return f"{directory}/{MANIFEST} is damaged"
    for rel, size, digest in entries:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            return f"{directory}/{MANIFEST} names a file outside the directory ({rel!r})"
        p = directory / rel
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != size or (deep and sha256_file(p) != digest):
            return f"{p} is damaged (size or checksum differs from {MANIFEST})"
    return None


def sweep_stale(path: str | Path) -> None:
    """Clean up after an ``atomic_dir(path)`` that was killed part-way.

    A kill between moving the old ``path`` aside and renaming the new one in leaves only
    ``.<name>.old-<pid>``: it is moved back. Unfinished temp directories are deleted.
    """
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return
    olds = sorted(parent.glob(f".{path.name}.old-*"))
    if olds and not path.exists():
        os.replace(olds.pop(), path)
        fsync_dir(parent)
    for stale in (*olds, *parent.glob(f".{path.name}.tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)


def publish_modes(directory: Path) -> None:
    """Give every entry under ``directory`` the mode the umask gives an ordinary file or directory.

    Writers that create private files (safetensors' ``save_file`` makes them 0600, ``mkstemp``
    too) would otherwise leave merged models and adapters unreadable to other users or a serving
    account, while the JSON next to them is 0644.
    """
    for p in directory.rglob("*"):
        if not p.is_symlink():
            ordinary_permissions(p, directory=p.is_dir())


def _fsync_tree(directory: Path) -> None:
    for p in directory.rglob("*"):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
    fsync_dir(directory)


@contextlib.contextmanager
def atomic_dir(path: str | Path, manifest: bool = True) -> Iterator[Path]:
    """Yield a temp directory; on success it replaces ``path`` in one rename.

    An existing ``path`` is moved aside first and deleted only once the new one is in place.
    On an exception the temp directory is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    ordinary_permissions(tmp, directory=True)
    try:
        yield tmp
        if manifest:
            write_manifest(tmp)
        publish_modes(tmp)
        _fsync_tree(tmp)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
