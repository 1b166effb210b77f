"""Adapters loaded on demand from a directory into a bounded LRU of resident adapters.

    adapters/
      support-bot/    adapter_config.json + adapter_model.safetensors   (model="support-bot")
      sql/            ...

An adapter name is one path component (letters, digits, ``.``, ``_``, ``-``; no ``..``), and the
directory it names must resolve (symlinks followed) to a direct child of the adapters directory:
no name can reach a file outside it. At most ``max_loaded`` adapters are resident (in the stacked
slots where the math runs); loading one more evicts the least recently used adapter that no running
sequence holds (``acquire`` / ``release`` count holders). Adapters given explicitly (``pinned``) are
never evicted.

Two tiers, as S-LoRA (Sheng et al., 2023) keeps them: besides the resident few, up to ``host_max``
adapters stay in host memory as checked, parsed factors (least recently used dropped first), so an
adapter evicted from the slots comes back without reading, parsing or checking its files again — a
thousand adapters over one base cost their factors' bytes, not a thousand loads per pass. The host
copy is keyed by the files' version, so a new version on disk is read and checked anew.

Hot-swap: saving a new version of a resident adapter into its directory (peftlab's save writes a
temporary directory and renames it into place, so a reader never sees half a version) replaces its
weights in place at the next request for it (``MultiLoRAModel.replace``: same slot, the base never
reloaded). A version change is seen from the files' inode, size and mtime. Sequences already
running finish on the version they started with: new requests for the adapter wait until none is
left, then the swap happens (no sequence mixes two versions). A new version that does not fit
fails its requests with the reason and leaves the old weights resident; while the directory is
missing (the instant between a save's two renames, or removed) the resident version serves on.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from pathlib import Path

from ..errors import ConfigError
from ..export.adapter import CONFIG_NAME, WEIGHTS_NAME
from .lora_dir import SERVED_TYPES
from .multi_lora import NAME_RX, MultiLoRAModel

_ABS_PATH = re.compile(r"(?<![\w.])/[^\s'\"(),;:]+")  # an absolute path inside a message


def _version(path: Path) -> tuple:
    """What identifies one saved version of an adapter directory: its files' names, inodes, sizes, mtimes."""
    stats = [(f.name, f.stat()) for f in sorted(path.iterdir()) if f.is_file()]
    return tuple((name, st.st_ino, st.st_size, st.st_mtime_ns) for name, st in stats)


class UnknownAdapter(ConfigError):
    """No adapter of that name (HTTP 404)."""


class AdapterStore:
    def __init__(self, mm: MultiLoRAModel, root: str | Path | None, max_loaded: int = 8,
                 pinned: dict[str, str | Path] | None = None, host_max: int | None = 1024):
        if max_loaded < 1:
            raise ConfigError(f"max_loaded must be >= 1, got {max_loaded}")
        if host_max is not None and host_max < 0:
            raise ConfigError(f"host_max must be >= 0 (0: no host tier), got {host_max}")
        self.host_max = 1024 if host_max is None else host_max
        self._host: OrderedDict[str, tuple] = OrderedDict()  # adapter -> (version, config, factors), oldest first
        self.mm = mm
        self.root = Path(root).resolve() if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise ConfigError(f"adapters directory {str(root)!r} does not exist")
        self.max_loaded = max_loaded
        self.pinned = {n: Path(p) for n, p in (pinned or {}).items()}
        self._lru: OrderedDict[str, None] = OrderedDict()  # resident adapters, oldest first
        self._holders: dict[str, int] = {}
        self._lock = threading.Lock()
        self._checked: dict[str, tuple] = {}  # adapter -> file mtimes that passed check()
        self._resident_version: dict[str, tuple] = {}  # adapter -> version of the files it was loaded from
        self.loads = 0
        self.evictions = 0
        self.swaps = 0  # in-place replacements of a resident adapter by a new version of its files
        self.disk_reads = 0  # adapter directories read and checked (the rest came from host memory)
        for name, path in self.pinned.items():
            mm.load(name, path)
            self._resident_version[name] = _version(path)
            self._lru[name] = None

    def resolve(self, name: str) -> Path:
        """The adapter directory of ``name``; UnknownAdapter if there is none (or the name is not allowed)."""
        if name in self.pinned:
            return self.pinned[name]
        if not isinstance(name, str) or not NAME_RX.match(name) or ".." in name:
            raise UnknownAdapter(f"{name!r} is not a valid adapter name (letters, digits, '.', '_', '-'; "
                                 "no path separators)")
        if self.root is None:
            raise UnknownAdapter(f"no adapter named {name!r} (no adapters directory was given)")
        path = (self.root / name).resolve()
        if path.parent != self.root:  # a symlink (or anything else) pointing out of the directory
            raise UnknownAdapter(f"no adapter named {name!r}")
        if not (path / CONFIG_NAME).is_file():
            raise UnknownAdapter(f"no adapter named {name!r}; available: {', '.join(self.names()) or 'none'}")
        return path

    def names(self) -> list[str]:
        found = set(self.pinned)
        if self.root is not None:
            for p in self.root.iterdir():
                if p.is_dir() and NAME_RX.match(p.name) and (p / CONFIG_NAME).is_file() and \
                        p.resolve().parent == self.root:
                    found.add(p.name)
        return sorted(found)

    def check(self, name: str) -> None:
        """Validation before a request is queued: the name exists, is a LoRA adapter and fits the base
        (shapes and recorded base weights), so a mismatch is refused before it reaches the engine.
        Each adapter is checked once per version of its files; a loaded one is not checked again."""
        path = self.resolve(name)
        with self._lock:
            if name in self.mm.adapters:
                return
        try:
            config = json.loads((path / CONFIG_NAME).read_text())
        except ValueError as e:
            raise ConfigError(f"adapter {name!r}: {CONFIG_NAME} is not valid JSON ({e})") from None
        if config.get("peft_type") not in SERVED_TYPES or config.get("use_dora"):
            raise ConfigError(f"adapter {name!r} is a {config.get('peft_type')}"
                              f"{' (DoRA)' if config.get('use_dora') else ''} adapter; this server serves LoRA only")
        if not (path / WEIGHTS_NAME).is_file():
            raise ConfigError(f"adapter {name!r} has no {WEIGHTS_NAME}")
        version = tuple(f.stat().st_mtime_ns for f in sorted(path.iterdir()) if f.is_file())
        if self._checked.get(name) == version:
            return
        try:
            self.mm.check_dir(name, path)
        except ConfigError as e:
            raise ConfigError(self._public(name, path, e)) from None
        self._checked[name] = version

    def _public(self, name: str, path: Path, error: Exception) -> str:
        """``error``'s message for an API client: the adapter by name, no path of this machine."""
        text = str(error).replace(str(path), f"adapter {name!r}")
        text = _ABS_PATH.sub(lambda m: Path(m.group(0)).name, text)
        return text if repr(name) in text else f"adapter {name!r}: {text}"

    def acquire(self, name: str) -> bool:
        """Make ``name`` resident (in its newest version) and hold it; False when it must wait: every
        resident adapter is held, or a new version of ``name`` waits for its running sequences."""
        with self._lock:
            if name in self.mm.adapters:
                try:
                    path = self.resolve(name)
                    version = _version(path)
                except (UnknownAdapter, FileNotFoundError):  # mid-rename, or removed: the resident one serves
                    path, version = None, self._resident_version.get(name)
                if version != self._resident_version.get(name):
                    if self._holders.get(name):
                        return False  # running sequences finish on the version they started with
                    try:
                        self.mm.replace(name, path)
                    except ConfigError as e:
                        raise ConfigError(self._public(name, path, e)) from None
                    self._resident_version[name] = version
                    self.swaps += 1
            else:
                path = self.resolve(name)
                if len(self._lru) >= self.max_loaded:
                    victim = next((n for n in self._lru if not self._holders.get(n) and n not in self.pinned), None)
                    if victim is None:
                        return False
                    self.mm.delete(victim)
                    del self._lru[victim]
                    self._resident_version.pop(victim, None)
                    self.evictions += 1
                version = _version(path)
                try:
                    config, factors = self._host_factors(name, path, version)
                    self.mm.load_checked(name, config, factors, path)
                except ConfigError as e:
                    raise ConfigError(self._public(name, path, e)) from None
                self._resident_version[name] = version
                self.loads += 1
            self._lru[name] = None
            self._lru.move_to_end(name)
            self._holders[name] = self._holders.get(name, 0) + 1
            return True

    def _host_factors(self, name: str, path: Path, version: tuple) -> tuple[dict, dict]:
        """(config, factors) of ``name`` at ``version``: from host memory, else read, checked and kept."""
        held = self._host.get(name)
        if held is not None and held[0] == version:
            self._host.move_to_end(name)
            return held[1], held[2]
        config, factors = self.mm.check_dir(name, path)
        self.disk_reads += 1
        if self.host_max:
            self._host[name] = (version, config, factors)
            self._host.move_to_end(name)
            while len(self._host) > self.host_max:
                self._host.popitem(last=False)
        return config, factors

    def release(self, name: str) -> None:
        with self._lock:
            if self._holders.get(name):
                self._holders[name] -= 1

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._lru)
