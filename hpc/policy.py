"""When to spend HPC time: the continual-learning policy (REFERENCE.md, workflow step 7).

The serving model is validated against the iterative reconstruction of a new scan. If its SSIM
is within tolerance (SSIM >= 1 - tolerance, e.g. < 10% off), reconstruction and retraining
are suspended and only a periodic check runs (e.g. hourly); a large mismatch (new features, a
data shift) resumes them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

#: what the caller should do with the scan
TRAIN = "train"  # reconstruct, label, append to the corpus, retrain (warm start), validate
CHECK = "check"  # reconstruct and validate the serving model, then call decide() with the SSIM
SUSPEND = "suspend"  # spend no HPC time on this scan
ACTIONS = (TRAIN, CHECK, SUSPEND)


@dataclass
class Decision:
    """One decision, with the reason a person can read in the log or on a screen."""

    scan_id: str
    action: str  # "train" | "check" | "suspend"
    reason: str
    ssim: float | None
    state: str  # policy state after the decision: "active" | "suspended"
    at: float  # time of the decision (s since the epoch)
    next_check_at: float | None  # when a suspended policy checks again; None while active

    def to_dict(self) -> dict:
        return asdict(self)


class ContinualPolicy:
    """Decides, scan by scan, whether to reconstruct and retrain or to suspend.

    States: ``active`` (training with every scan) and ``suspended`` (periodic checks only).
    ``decide(scan_id, ssim, now)`` where ``ssim`` is the serving model's SSIM on this scan
    against its iterative reconstruction (from :func:`ptychostream.hpc.validate`), or None
    when it has not been measured:

    - active, ssim None -> ``train`` (no evidence the model is good enough yet, e.g. no model);
    - active, ssim >= 1 - tolerance -> ``suspend``; next check at now + check_interval_s;
    - active, ssim below that -> ``train``;
    - suspended, ssim None, before the next check -> ``suspend``;
    - suspended, ssim None, check due -> ``check``: the caller reconstructs this scan,
      validates the serving model and calls ``decide`` again with the SSIM;
    - suspended, ssim >= 1 - resume_tolerance -> ``suspend``, next check one interval on;
    - suspended, ssim below that (a large mismatch) -> ``train`` and back to active.

    ``resume_tolerance`` (default: ``tolerance``) may be set larger for hysteresis, so only a
    large mismatch resumes training. ``min_train_scans`` trains on at least that many scans
    before the first suspension. Every decision is logged and kept in ``history``.
    """

    def __init__(
        self,
        tolerance: float = 0.1,
        check_interval_s: float = 3600.0,
        resume_tolerance: float | None = None,
        min_train_scans: int = 0,
    ) -> None:
        if not 0.0 < tolerance < 1.0:
            raise ValueError(f"tolerance must be in (0, 1), got {tolerance}")
        if check_interval_s <= 0:
            raise ValueError(f"check_interval_s must be > 0, got {check_interval_s}")
        self.tolerance = float(tolerance)
        self.resume_tolerance = float(tolerance if resume_tolerance is None else resume_tolerance)
        if not self.tolerance <= self.resume_tolerance < 1.0:
            raise ValueError("resume_tolerance must be in [tolerance, 1)")
        self.check_interval_s = float(check_interval_s)
        self.min_train_scans = int(min_train_scans)
        self.state = "active"
        self.next_check_at: float | None = None
        self.trained_scans = 0
        self.history: list[Decision] = []

    @property
    def suspended(self) -> bool:
        return self.state == "suspended"

    def decide(self, scan_id: str, ssim: float | None = None, now: float | None = None) -> Decision:
        """The action for ``scan_id`` given the serving model's SSIM on it (or None)."""
        now = time.time() if now is None else float(now)
        if ssim is not None:
            ssim = float(ssim)
            if not -1.0 <= ssim <= 1.0:
                raise ValueError(f"SSIM must be in [-1, 1], got {ssim}")
        if self.state == "active":
            action, reason = self._active(ssim, now)
        else:
            action, reason = self._suspended(ssim, now)
        if action == TRAIN:
            self.trained_scans += 1
        d = Decision(scan_id, action, reason, ssim, self.state, now, self.next_check_at)
        self.history.append(d)
        log.info("policy: %s -> %s (%s)", scan_id, action, reason)
        return d

    def _active(self, ssim: float | None, now: float) -> tuple[str, str]:
        if ssim is None:
            return TRAIN, "training active and the serving model is not validated on this scan"
        gap = 1.0 - ssim
        if gap <= self.tolerance and self.trained_scans >= self.min_train_scans:
            self.state, self.next_check_at = "suspended", now + self.check_interval_s
            return SUSPEND, (f"SSIM {ssim:.3f} within tolerance {self.tolerance:.0%} of the iterative "
                             f"result: reconstruction and training suspended, next check in "
                             f"{self.check_interval_s:.0f} s")
        if gap <= self.tolerance:
            return TRAIN, (f"SSIM {ssim:.3f} within tolerance but only {self.trained_scans} of "
                           f"{self.min_train_scans} scans trained so far")
        return TRAIN, f"SSIM {ssim:.3f} below {1 - self.tolerance:.3f}: keep training"

    def _suspended(self, ssim: float | None, now: float) -> tuple[str, str]:
        if ssim is None:
            if now >= (self.next_check_at or 0.0):
                return CHECK, "periodic check due: reconstruct this scan and validate the serving model"
            return SUSPEND, f"suspended; next check in {self.next_check_at - now:.0f} s"
        gap = 1.0 - ssim
        if gap > self.resume_tolerance:
            self.state, self.next_check_at = "active", None
            return TRAIN, (f"SSIM {ssim:.3f} below {1 - self.resume_tolerance:.3f}: large mismatch "
                           "(new features or a data shift), reconstruction and training resumed")
        self.next_check_at = now + self.check_interval_s
        return SUSPEND, (f"check passed, SSIM {ssim:.3f} within tolerance: stay suspended, next check "
                         f"in {self.check_interval_s:.0f} s")

    def to_dict(self) -> dict:
        """Plain-value snapshot (for a PV, a log record or a JSON status file)."""
        return {
            "state": self.state, "tolerance": self.tolerance, "resume_tolerance": self.resume_tolerance,
            "check_interval_s": self.check_interval_s, "next_check_at": self.next_check_at,
            "trained_scans": self.trained_scans, "history": [d.to_dict() for d in self.history],
        }
