"""Model store: the accepted models on disk, so a restarted IOC serves what it served before.

One folder: ``model-v0003.onnx`` (or ``.pt`` for a PyTorch state dict) per accepted model, a
``model-v0003.json`` beside it (name, size, sha256: a truncated or altered file is known
without parsing it), and ``current.json`` naming the one serving. Every file is written whole
(temporary file, fsync, rename), so a crash leaves the old file or the new one; temporary
files a crash left behind are removed on open.

On start the IOC tries :meth:`ModelStore.candidates` in order (the current model, then the
others newest first) and serves the first that verifies and validates, saying which it skipped.
A corrupt ``current.json`` is recovered from the files. Version numbers never repeat: the next
is one above every version the folder has seen (files, sidecars, ``current.json``), so a
rollback to v3 followed by a deploy makes v6, not v4.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ptychostream.modelfile import is_onnx

log = logging.getLogger(__name__)

_FILE = re.compile(r"^model-v(\d+)\.(onnx|pt)$")


class StoreError(OSError):
    """A stored model that cannot be used (missing, truncated, altered), or a store problem."""


@dataclass
class StoredModel:
    version: int
    name: str
    file: str
    saved: float
    sha256: str = ""  # empty for files stored before sidecars existed
    size: int = -1

    @property
    def path(self) -> Path:
        return Path(self.file)


class ModelStore:
    """Keeps the ``keep`` most recent accepted models in ``folder`` (and always the current)."""

    def __init__(self, folder: str | Path, keep: int = 5) -> None:
        self.folder = Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.keep = max(1, int(keep))
        self.problems: list[str] = []  # what start-up found wrong, for ModelStatus_RBV
        for tmp in self.folder.glob("*.tmp"):
            if not tmp.is_file():
                continue
            tmp.unlink(missing_ok=True)
            log.warning("model store %s: removed %s left by an interrupted save", self.folder,
                        tmp.name)

    @property
    def _current_file(self) -> Path:
        return self.folder / "current.json"

    # ------------------------------------------------------------------ reading
    def _read_current(self) -> dict | None:
        try:
            info = json.loads(self._current_file.read_text())
            if not isinstance(info, dict) or not isinstance(info.get("version"), int):
                raise ValueError("no version")
            return info
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, OSError, UnicodeDecodeError) as exc:
            msg = f"current.json unreadable ({exc.__class__.__name__}): recovered from the files"
            if msg not in self.problems:
                self.problems.append(msg)
                log.warning("model store %s: %s", self.folder, msg)
            return None

    def entries(self) -> list[StoredModel]:
        """Every stored model, newest first (from the sidecars; a model file without one
        gets its name from current.json, else its file name)."""
        current = self._read_current() or {}
        out = []
        for path in self.folder.iterdir():
            m = _FILE.match(path.name)
            if not m:
                continue
            version = int(m.group(1))
            info = None
            try:
                info = json.loads(path.with_suffix(".json").read_text())
                entry = StoredModel(**{k: info[k] for k in ("version", "name", "file", "saved",
                                                              "sha256", "size")})
                entry.file = str(path)
            except (OSError, ValueError, TypeError, KeyError):
                name = current.get("name", "") if current.get("version") == version else ""
                entry = StoredModel(version, name or path.stem, str(path), path.stat().st_mtime)
            out.append(entry)
        return sorted(out, key=lambda e: e.version, reverse=True)

    def get(self, version: int) -> StoredModel | None:
        return next((e for e in self.entries() if e.version == int(version)), None)

    def current(self) -> StoredModel | None:
        """The model that served last, or None (empty store, unreadable current.json, or its
        file gone)."""
        info = self._read_current()
        if info is None:
            return None
        entry = self.get(info["version"])
        if entry is None:
            log.warning("model store %s: current model v%d is missing", self.folder,
                        info["version"])
        return entry

    def candidates(self) -> list[StoredModel]:
        """What a restart should try, in order: the current model, then the others, newest
        first."""
        current = self.current()
        rest = [e for e in self.entries() if current is None or e.version != current.version]
        return ([current] if current else []) + rest

    def read(self, entry: StoredModel) -> bytes:
        """The model's bytes, checked against its sidecar; StoreError says what is wrong."""
        try:
            data = entry.path.read_bytes()
        except OSError as exc:
            raise StoreError(f"v{entry.version}: cannot read {entry.path.name}: "
                             f"{exc.strerror or exc}") from exc
        if entry.size >= 0 and len(data) != entry.size:
            raise StoreError(f"v{entry.version}: {entry.path.name} is truncated ({len(data)} of "
                             f"{entry.size} bytes)")
        if entry.sha256 and hashlib.sha256(data).hexdigest() != entry.sha256:
            raise StoreError(f"v{entry.version}: {entry.path.name} does not match its sha256")
        if not data:
            raise StoreError(f"v{entry.version}: {entry.path.name} is empty")
        return data

    def highest(self) -> int:
        """The highest version this folder has seen (0: none)."""
        seen = [e.version for e in self.entries()]
        info = self._read_current() or {}
        seen += [int(info.get("version", 0)), int(info.get("highest", 0))]
        return max(seen, default=0)

    def next_version(self) -> int:
        return self.highest() + 1

    def history(self, serving: int = 0, limit: int = 255) -> str:
        """One line for NN:ModelHistory_RBV: ``*v5 name | v4 name | ...`` (``*``: serving)."""
        parts = [f"{'*' if e.version == serving else ''}v{e.version} {e.name}"
                 for e in self.entries()]
        text = " | ".join(parts) or "(empty)"
        return text if len(text) <= limit else text[:limit - 3] + "..."

    # ------------------------------------------------------------------ writing
    def save(self, data: bytes, name: str, version: int) -> StoredModel:
        """Write an accepted model and make it current; never overwrites a version."""
        if version <= self.highest():
            raise StoreError(f"version {version} is already used in {self.folder} "
                             f"(next is {self.next_version()})")
        ext = ".onnx" if is_onnx(data) else ".pt"
        path = self.folder / f"model-v{version:04d}{ext}"
        info = StoredModel(version, name, str(path), time.time(),
                           hashlib.sha256(data).hexdigest(), len(data))
        _atomic_write(path, data)
        _atomic_write(path.with_suffix(".json"), json.dumps(asdict(info), indent=1).encode())
        self._write_current(info)
        self._prune(version)
        log.info("model %s v%d saved to %s", name, version, path)
        return info

    def select(self, version: int) -> StoredModel:
        """Make stored ``version`` current (a rollback); StoreError when it is not stored."""
        entry = self.get(version)
        if entry is None:
            raise StoreError(f"no stored model v{version}")
        self._write_current(entry)
        return entry

    def _write_current(self, entry: StoredModel) -> None:
        info = {**asdict(entry), "highest": max(self.highest(), entry.version)}
        _atomic_write(self._current_file, json.dumps(info, indent=1).encode())

    def _prune(self, current: int) -> None:
        for old in self.entries()[self.keep:]:
            if old.version == current:
                continue
            old.path.unlink(missing_ok=True)
            old.path.with_suffix(".json").unlink(missing_ok=True)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: a temporary file, fsync, rename; a failed write
    leaves no temporary file behind."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
