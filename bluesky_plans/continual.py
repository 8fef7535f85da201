"""The continual-learning plan: scan, then let the HPC side learn from the scan (REFERENCE.md,
workflow steps 2, 3, 4 and 7).

After each scan the plan submits reconstruction, labels, training and validation to an executor
(local process pool or Globus Compute: any ``concurrent.futures.Executor``) and waits for each
without blocking the RunEngine; a new model that validates better than the serving one goes to
the IOC by a PV write; ``$(P)QA:SSIM`` and ``$(P)QA:Decision`` follow; the policy decides
whether the next scan trains, is only checked, or costs no HPC time at all.

    learner = ContinualLearner(get_executor(), "work/")
    RE(continual_learning_plan(det, stage, learner, [dict(n_points=400, overlap=0.9)] * 5, ioc=ioc))
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path

from bluesky import plan_stubs as bps
from bluesky.utils import FailedStatus

from ptychostream.bluesky_plans.plans import ptycho_scan, spiral_ptycho_scan
from ptychostream.hpc import (
    ContinualPolicy,
    corpus_append,
    make_labels,
    reconstruct,
    train,
    validate,
)
from ptychostream.hpc.policy import CHECK, SUSPEND, TRAIN

log = logging.getLogger(__name__)

DECISION_LENGTH = 255  # QA:Decision is a 256-character CA string


@dataclass
class ContinualLearner:
    """What the loop remembers between scans: where files go, which model serves, the policy.

    ``serving_model``: the state dict now serving (warm start and first validation); None
    before the first model. Options are passed to the HPC functions unchanged.
    """

    executor: Executor
    work_dir: str | Path
    policy: ContinualPolicy = field(default_factory=ContinualPolicy)
    recon_options: dict = field(default_factory=dict)
    train_options: dict = field(default_factory=dict)
    validate_options: dict = field(default_factory=dict)
    serving_model: str | None = None
    deploy_probe: bool = True  # send each reconstruction's probe to the IOC (live refinement)
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.work_dir = Path(self.work_dir)

    @property
    def corpus_dir(self) -> Path:
        return Path(self.work_dir) / "corpus"


# --------------------------------------------------------------------------- plan stubs
def remote(executor: Executor, fn: Callable, *args, poll: float = 0.2, **kwargs):
    """Run ``fn(*args, **kwargs)`` on the executor; the RunEngine stays responsive meanwhile.

    Waits with a checkpoint every ``poll`` s, so one Ctrl-C pauses the plan within ``poll`` s
    (RunEngine pause semantics: ``RE.resume()`` goes on waiting for the same task,
    ``RE.abort()``/``RE.stop()`` cancel it and stop a local worker that runs it). Returns the
    function's result (re-raises its exception); None in a dry run (summarize_plan,
    check_limits), where nothing is submitted."""
    name = getattr(fn, "__name__", str(fn))
    box: dict = {}

    def submit():
        if "future" not in box:  # a replayed message (resume after a hard pause) submits once
            log.info("%s submitted", name)
            box["future"] = executor.submit(fn, *args, **kwargs)
            box["t0"] = time.perf_counter()
        return box["future"]

    future = yield from call(submit)
    if future is None:  # dry run
        return None
    finished = False
    try:
        while not future.done():
            yield from bps.checkpoint()
            yield from bps.sleep(poll)
        finished = True
    finally:
        if not finished:  # aborted, stopped or closed while the task runs
            _cancel(executor, future, name)
    log.info("%s done in %.1f s", name, time.perf_counter() - box["t0"])
    return future.result()


def _cancel(executor: Executor, future, name: str) -> None:
    """Cancel a task whose plan was aborted; a local worker that already runs it is stopped."""
    if future.cancel():
        log.info("%s cancelled", name)
        return
    terminate = getattr(executor, "terminate", None)
    if terminate is not None:
        log.info("%s interrupted: stopping its local worker", name)
        terminate()
    else:  # a remote endpoint (Globus Compute): the task finishes there, its result is dropped
        log.info("%s left to finish on its endpoint; its result will be ignored", name)


def call(fn: Callable, *args, **kwargs):
    """Call a quick local function when the RunEngine reaches this step (not when the plan is
    merely inspected): keeps dry runs free of side effects such as policy decisions."""

    async def run():
        return fn(*args, **kwargs)

    tasks = yield from bps.wait_for([run])
    return tasks[0].result() if tasks else None


def report_decision(ioc, decision):
    """Write the policy's decision and reason to ``$(P)QA:Decision``."""
    if ioc is None:
        return
    text = "dry run" if decision is None else f"{decision.action}: {decision.reason}"
    yield from bps.mv(ioc.qa.decision, text[:DECISION_LENGTH])


def report_ssim(ioc, ssim: float | None):
    """Write the serving model's SSIM to ``$(P)QA:SSIM`` (nothing when not measured)."""
    if ioc is not None and ssim is not None:
        yield from bps.mv(ioc.qa.ssim, float(ssim))


def deploy(ioc, learner: ContinualLearner, trained: dict | None, name: str):
    """Send a trained model (ONNX) to the IOC by a PV write; it then serves and warm-starts the
    next training. Returns False (and the old model keeps serving) if the IOC refuses it."""
    onnx = trained["onnx"] if trained else "model.onnx"
    if ioc is not None:
        try:
            yield from bps.mv(ioc.nn.model, (onnx, name))
        except FailedStatus as exc:
            log.error("the IOC refused model %s (%s): %s", name, onnx, exc.__cause__ or exc)
            return False
    if trained:
        yield from call(setattr, learner, "serving_model", trained["state_dict"])
    return True


def deploy_probe(ioc, recon_path: str | None, name: str):
    """Send the probe a reconstruction recovered to the IOC (one PV write, validated there like
    a model): the live map refines with the probe the HPC side measured, not a guess. Returns
    False (the IOC keeps its old probe) when it is refused."""
    if ioc is None or not recon_path or not hasattr(ioc.stitch, "probe"):
        return False
    try:
        yield from bps.mv(ioc.stitch.probe, (recon_path, name))
    except FailedStatus as exc:
        log.error("the IOC refused probe %s (%s): %s", name, recon_path, exc.__cause__ or exc)
        return False
    return True


# --------------------------------------------------------------------------- one scan
def learn_from_scan(learner: ContinualLearner, scan_path: str | Path, ioc=None,
                    scan_id: str | None = None):
    """One round of the loop on a finished scan, as the policy directs. Returns its record.

    suspend: nothing runs. check: reconstruct, validate the serving model, ask the policy
    again. train: reconstruct, validate the serving model (if any), label, append to the
    corpus, train (warm start), validate the new model, deploy it if it beats the serving one.
    """
    ex, policy = learner.executor, learner.policy
    scan_path = str(scan_path)
    stem = Path(scan_path).stem
    scan_id = scan_id or stem
    work = Path(learner.work_dir)
    record: dict = {"scan_id": scan_id, "scan_path": scan_path, "decisions": [],
                    "serving_ssim": None, "new_ssim": None, "deployed": None}

    decision = yield from call(policy.decide, scan_id, None)
    record["decisions"].append(decision and decision.to_dict())
    yield from report_decision(ioc, decision)
    if decision is not None and decision.action == SUSPEND:
        yield from _finish_round(learner, record, ioc)
        return record

    yield from call(work.mkdir, parents=True, exist_ok=True)
    recon = yield from remote(ex, reconstruct, scan_path, str(work / f"{stem}.recon.h5"),
                              **learner.recon_options)
    record["recon"] = recon
    if learner.deploy_probe:
        record["probe_deployed"] = yield from deploy_probe(ioc, recon, f"probe-{stem}")
    serving_ssim = None
    if learner.serving_model:
        check = yield from remote(ex, validate, learner.serving_model, scan_path, recon,
                                  **learner.validate_options)
        serving_ssim = check["ssim"] if check else None
        record["serving_ssim"] = serving_ssim
        yield from report_ssim(ioc, serving_ssim)
        if decision is None or decision.action == CHECK or policy.state == "active":
            decision = yield from call(policy.decide, scan_id, serving_ssim)
            record["decisions"].append(decision and decision.to_dict())
            yield from report_decision(ioc, decision)
    if decision is not None and decision.action != TRAIN:
        yield from _finish_round(learner, record, ioc)
        return record

    labels = yield from remote(ex, make_labels, scan_path, recon, str(work / f"{stem}.labels.h5"))
    record["corpus"] = yield from remote(ex, corpus_append, str(learner.corpus_dir), labels)
    trained = yield from remote(ex, train, str(learner.corpus_dir), str(work / f"model-{stem}"),
                                warm_start=learner.serving_model, **learner.train_options)
    record["train"] = trained and {k: v for k, v in trained.items() if k != "history"}
    new = yield from remote(ex, validate, trained["state_dict"] if trained else "", scan_path,
                            recon, **learner.validate_options)
    new_ssim = new["ssim"] if new else None
    record["new_ssim"] = new_ssim
    if new_ssim is None or serving_ssim is None or new_ssim > serving_ssim:
        if (yield from deploy(ioc, learner, trained, name=f"ptychonn-{stem}")):
            record["deployed"] = trained["onnx"] if trained else None
            yield from report_ssim(ioc, new_ssim)
    else:
        log.info("new model (SSIM %.3f) is no better than the serving one (%.3f): kept serving",
                 new_ssim, serving_ssim)
    yield from _finish_round(learner, record, ioc)
    return record


def round_summary(record: dict) -> str:
    """One line for the console: what the round deployed, the SSIMs, the decision and why."""
    def f(v):
        return "-" if v is None else f"{v:.3f}"

    last = (record.get("decisions") or [None])[-1] or {}
    version = record.get("model_version")
    served = "" if version is None else f"serving v{version}" + (
        f" ({record['model_name']})" if record.get("model_name") else "")
    deployed = "deployed a new model" if record.get("deployed") else "kept the model"
    return (f"round {record['scan_id']}: {deployed}; {served or 'no IOC'}; "
            f"QA:SSIM {f(record.get('qa_ssim'))} (serving {f(record.get('serving_ssim'))}, "
            f"new {f(record.get('new_ssim'))}); decision {last.get('action', '-')}: "
            f"{last.get('reason', 'dry run')}")


def _finish_round(learner: ContinualLearner, record: dict, ioc):
    """Record what the IOC serves now, say it on the console, keep the record."""
    if ioc is not None:
        record["model_version"] = yield from bps.rd(ioc.nn.model_version, default_value=None)
        record["model_name"] = yield from bps.rd(ioc.nn.model_name, default_value=None)
        record["qa_ssim"] = yield from bps.rd(ioc.qa.ssim, default_value=None)
    else:
        record["qa_ssim"] = record["new_ssim"] if record.get("deployed") else record["serving_ssim"]
    yield from call(log.info, "%s", round_summary(record))
    yield from call(learner.history.append, record)


# --------------------------------------------------------------------------- the loop
def continual_learning_plan(detector, stage, learner: ContinualLearner, scans: Sequence[dict],
                            ioc=None):
    """Scan after scan, each followed by :func:`learn_from_scan`. Returns the records.

    ``scans``: keyword arguments of :func:`~ptychostream.bluesky_plans.plans.spiral_ptycho_scan`
    for each scan (n_points, step or overlap, exposure, center, scan_name, ...), or of
    :func:`~ptychostream.bluesky_plans.plans.ptycho_scan` when it gives ``positions`` (a route,
    (N, 2) m). With the simulated detector a scan may also name ``sample=(kind, seed)``.
    """
    records = []
    for i, spec in enumerate(scans):
        spec = dict(spec)
        sample = spec.pop("sample", None)
        if sample is not None:
            kind, seed = sample
            yield from bps.mv(detector.sample_kind, kind, detector.sample_seed, int(seed))
        scan_name = spec.pop("scan_name", None) or f"cl-{i:03d}"
        file_path = spec.pop("file_path", None)
        if file_path is None:
            if not hasattr(detector, "write_dir"):
                raise ValueError(f"scan {i}: give file_path= (where {detector.name} writes the "
                                 "scan file the HPC side reads)")
            file_path = Path(detector.write_dir) / f"{scan_name}.h5"
        if "positions" in spec:  # a given route
            yield from ptycho_scan(detector, stage, spec.pop("positions"), ioc=ioc,
                                   scan_name=scan_name, file_path=file_path, **spec)
        else:
            yield from spiral_ptycho_scan(detector, stage, ioc=ioc, scan_name=scan_name,
                                          file_path=file_path, **spec)
        record = yield from learn_from_scan(learner, file_path, ioc, scan_id=scan_name)
        records.append(record)
    return records
