"""Model store: the last good models on disk, so a restarted IOC serves what it served before.

One folder: ``model-v0003.onnx`` (or ``.pt`` for a PyTorch state dict) per accepted model and
``current.json`` naming the one serving, written atomically (temporary file + rename).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ptychostream.model import is_onnx

log = logging.getLogger(__name__)


@dataclass
class StoredModel:
    version: int
    name: str
    file: str
    saved: float

    @property
    def path(self) -> Path:
        return Path(self.file)


class ModelStore:
    """Keeps the ``keep`` most recent accepted models in ``folder``."""

    def __init__(self, folder: str | Path, keep: int = 5) -> None:
        self.folder = Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.keep = keep

    @property
    def _current_file(self) -> Path:
        return self.folder / "current.json"

    def current(self) -> StoredModel | None:
        """The model that served last, or None (empty store, or its file is gone)."""
        try:
            info = StoredModel(**json.loads(self._current_file.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            log.warning("model store %s: unreadable current.json (%s)", self.folder, exc)
            return None
        if not info.path.exists():
            log.warning("model store %s: %s is missing", self.folder, info.file)
            return None
        return info

    def save(self, data: bytes, name: str, version: int) -> StoredModel:
        """Write an accepted model and make it current."""
        ext = ".onnx" if is_onnx(data) else ".pt"
        path = self.folder / f"model-v{version:04d}{ext}"
        _atomic_write(path, data)
        info = StoredModel(version, name, str(path), time.time())
        _atomic_write(self._current_file, json.dumps(asdict(info), indent=1).encode())
        self._prune()
        log.info("model %s v%d saved to %s", name, version, path)
        return info

    def _prune(self) -> None:
        files = sorted(self.folder.glob("model-v*.*"))
        for old in files[: max(0, len(files) - self.keep)]:
            old.unlink(missing_ok=True)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
