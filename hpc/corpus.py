"""The training corpus: labelled pairs from every scan so far, with provenance (workflow step 3).

A corpus is a folder::

    corpus_dir/
      manifest.json            one entry per scan: scan id, reconstruction id, file, pairs, time
      pairs/<scan>__<recon>.h5 the labels files (copies), the corpus's only data

Appending copies a labels file in and rewrites the manifest atomically under a file lock, so
the corpus grows with the experiment, several writers cannot corrupt it, and
:meth:`Corpus.rebuild` regenerates the manifest from the files alone. A scan labelled again
(a better reconstruction) replaces its older pairs instead of duplicating them.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PAIRS = "pairs"


class CorpusError(ValueError):
    """A corpus folder or labels file that cannot be used: says why."""


@dataclass
class CorpusEntry:
    scan_id: str
    recon_id: str
    file: str  # relative to the corpus folder
    n_pairs: int
    appended_at: float
    source: str = ""  # the labels file it was copied from


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:120] or "unnamed"


@contextmanager
def _locked(corpus_dir: Path):
    """Exclusive advisory lock on the corpus (flock: released even if the holder dies)."""
    corpus_dir.mkdir(parents=True, exist_ok=True)
    with open(corpus_dir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _describe_labels(path: Path) -> tuple[str, str, int]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "labels" not in f or "frames" not in f:
                raise CorpusError(f"{path} is not a labels file (no frames/labels datasets)")
            n, n_lab = f["frames"].shape[0], f["labels"].shape[0]
            if n != n_lab:
                raise CorpusError(f"{path}: {n} frames but {n_lab} labels")
            a = f.attrs
            scan_id, recon_id = a.get("scan_id"), a.get("recon_id")
    except OSError as exc:
        raise CorpusError(f"{path} is not a readable HDF5 file: {exc}") from exc
    if not scan_id or not recon_id:
        raise CorpusError(f"{path} lacks scan_id / recon_id provenance")
    dec = lambda v: v.decode() if isinstance(v, bytes) else str(v)  # noqa: E731
    return dec(scan_id), dec(recon_id), int(n)


class Corpus:
    """Read side of a corpus folder: entries, sizes, and the pairs as arrays."""

    def __init__(self, corpus_dir: str | Path) -> None:
        self.dir = Path(corpus_dir)
        self.entries: list[CorpusEntry] = self._read_manifest()

    def _read_manifest(self) -> list[CorpusEntry]:
        path = self.dir / MANIFEST
        if not path.exists():
            return []
        try:
            data = json.loads(path.read_text())
            return [CorpusEntry(**e) for e in data["entries"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise CorpusError(f"{path} is damaged ({exc}); run Corpus.rebuild({str(self.dir)!r})") from exc

    def _write_manifest(self) -> None:
        tmp = self.dir / (MANIFEST + ".part")
        tmp.write_text(json.dumps(
            {"format": 1, "updated": time.time(), "entries": [asdict(e) for e in self.entries]},
            indent=1,
        ))
        os.replace(tmp, self.dir / MANIFEST)

    @property
    def n_pairs(self) -> int:
        return sum(e.n_pairs for e in self.entries)

    @property
    def n_scans(self) -> int:
        return len(self.entries)

    def summary(self) -> dict:
        return {
            "corpus_dir": str(self.dir), "n_pairs": self.n_pairs, "n_scans": self.n_scans,
            "scans": [e.scan_id for e in self.entries],
            "recon_ids": [e.recon_id for e in self.entries],
        }

    def append(self, labels_path: str | Path) -> dict:
        """Copy a labels file into the corpus (replacing older pairs of the same scan)."""
        src = Path(labels_path)
        if not src.exists():
            raise CorpusError(f"labels file {src} does not exist")
        scan_id, recon_id, n = _describe_labels(src)
        with _locked(self.dir):
            self.entries = self._read_manifest()  # another writer may have appended meanwhile
            rel = f"{PAIRS}/{_safe(scan_id)}__{_safe(recon_id)}.h5"
            dst = self.dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(dst.name + ".part")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
            old = [e for e in self.entries if e.scan_id == scan_id]
            self.entries = [e for e in self.entries if e.scan_id != scan_id]
            self.entries.append(CorpusEntry(scan_id, recon_id, rel, n, time.time(), str(src)))
            self._write_manifest()
            for e in old:
                if e.file != rel:
                    (self.dir / e.file).unlink(missing_ok=True)
                    log.info("corpus: %s superseded by %s", e.recon_id, recon_id)
        log.info("corpus %s: +%d pairs from %s (%s): %d pairs, %d scans",
                 self.dir, n, scan_id, recon_id, self.n_pairs, self.n_scans)
        return {**self.summary(), "added": n, "scan_id": scan_id, "recon_id": recon_id,
                "replaced": [e.recon_id for e in old]}

    @classmethod
    def rebuild(cls, corpus_dir: str | Path) -> Corpus:
        """Regenerate the manifest from the files under ``pairs/`` (after damage or a copy)."""
        corpus = cls.__new__(cls)
        corpus.dir = Path(corpus_dir)
        with _locked(corpus.dir):
            corpus.entries = []
            for path in sorted((corpus.dir / PAIRS).glob("*.h5")):
                scan_id, recon_id, n = _describe_labels(path)
                entry = CorpusEntry(scan_id, recon_id, f"{PAIRS}/{path.name}", n, path.stat().st_mtime)
                corpus.entries = [e for e in corpus.entries if e.scan_id != scan_id] + [entry]
            corpus._write_manifest()
        log.info("corpus %s rebuilt: %d pairs, %d scans", corpus.dir, corpus.n_pairs, corpus.n_scans)
        return corpus

    def load(self, max_pairs: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        """All pairs (or a random ``max_pairs`` of them) in memory.

        Returns frames (N, 128, 128) as stored, labels (N, 128, 128) float32, label_weight
        (N, 128, 128) uint8, and provenance: entry (N,) index into ``self.entries``, frame (N,)
        index within that scan."""
        import h5py

        if not self.entries:
            raise CorpusError(f"corpus {self.dir} is empty")
        index = np.concatenate([
            np.stack([np.full(e.n_pairs, i), np.arange(e.n_pairs)], 1) for i, e in enumerate(self.entries)
        ])
        if max_pairs is not None and max_pairs < len(index):
            if max_pairs < 1:
                raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
            pick = np.random.default_rng(seed).choice(len(index), max_pairs, replace=False)
            index = index[np.sort(pick)]
        frames, labels, weights = [], [], []
        for i, e in enumerate(self.entries):
            rows = index[index[:, 0] == i, 1]
            if len(rows) == 0:
                continue
            path = self.dir / e.file
            if not path.exists():
                raise CorpusError(f"corpus file {path} is missing; run Corpus.rebuild")
            with h5py.File(path, "r") as f:
                frames.append(f["frames"][rows])
                labels.append(f["labels"][rows].astype(np.float32))
                w = f["label_weight"][rows] if "label_weight" in f else np.ones_like(labels[-1], np.uint8)
                weights.append(w.astype(np.uint8))
        return {
            "frames": np.concatenate(frames), "labels": np.concatenate(labels),
            "label_weight": np.concatenate(weights), "entry": index[:, 0], "frame": index[:, 1],
        }


def corpus_append(corpus_dir: str, labels_path: str) -> dict:
    """Append a labels file to the corpus at ``corpus_dir`` (created if new).

    Returns {"n_pairs", "n_scans", "added", "scan_id", "recon_id", "replaced", "scans",
    "recon_ids", "corpus_dir"}: plain values, so it travels back from a Globus Compute endpoint.
    """
    return Corpus(corpus_dir).append(labels_path)
