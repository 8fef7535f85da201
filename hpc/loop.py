"""One round of the HPC loop for one finished scan, through any executor.

``hpc_round`` chains the remote functions the way the continual-learning loop uses them
(reconstruct -> validate the serving model -> policy -> labels -> corpus -> train -> validate
the new model), each step a task on the executor, data moving as files in ``work_dir``.
The Bluesky plans and the demo call it; it is also the end-to-end test of this package.
"""

from __future__ import annotations

import logging
from concurrent.futures import Executor
from pathlib import Path

from .corpus import corpus_append
from .labels import make_labels
from .policy import CHECK, SUSPEND, TRAIN, ContinualPolicy
from .reconstruct import reconstruct
from .train import train
from .validate import validate

log = logging.getLogger(__name__)


def hpc_round(
    executor: Executor,
    scan_path: str,
    work_dir: str,
    corpus_dir: str,
    serving_model: str | None = None,
    policy: ContinualPolicy | None = None,
    recon_options: dict | None = None,
    train_options: dict | None = None,
    scan_id: str | None = None,
) -> dict:
    """Run what the policy asks for on one scan; returns a plain-value report.

    ``serving_model``: the state dict now serving (warm start and the model validated first).
    Report keys: decisions (list of Decision dicts), recon, labels, corpus, train, validation
    (the new model's), serving_validation (the old model's), new_model (state dict path or
    None). A new model is offered only when it validates better than the serving one.
    """
    policy = policy or ContinualPolicy()
    recon_options = dict(recon_options or {})
    train_options = dict(train_options or {})
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    stem = Path(scan_path).stem
    scan_id = scan_id or stem
    report: dict = {"scan_path": str(scan_path), "decisions": [], "new_model": None}

    decision = policy.decide(scan_id, None)
    report["decisions"].append(decision.to_dict())
    if decision.action == SUSPEND:
        return report
    recon = executor.submit(reconstruct, str(scan_path), str(work / f"{stem}.recon.h5"),
                            **recon_options).result()
    report["recon"] = recon
    serving_ssim = None
    if serving_model:
        report["serving_validation"] = executor.submit(validate, serving_model, str(scan_path), recon).result()
        serving_ssim = report["serving_validation"]["ssim"]
        if decision.action == CHECK or policy.state == "active":
            decision = policy.decide(scan_id, serving_ssim)
            report["decisions"].append(decision.to_dict())
    if decision.action != TRAIN:
        return report
    labels = executor.submit(make_labels, str(scan_path), recon, str(work / f"{stem}.labels.h5")).result()
    report["labels"] = labels
    report["corpus"] = executor.submit(corpus_append, str(corpus_dir), labels).result()
    model_dir = work / f"model-{stem}"
    report["train"] = executor.submit(
        train, str(corpus_dir), str(model_dir), warm_start=serving_model, **train_options
    ).result()
    new_model = report["train"]["state_dict"]
    report["validation"] = executor.submit(validate, new_model, str(scan_path), recon).result()
    if serving_ssim is None or report["validation"]["ssim"] > serving_ssim:
        report["new_model"] = new_model
    log.info("HPC round on %s: new model SSIM %.3f (serving %s)", scan_id,
             report["validation"]["ssim"], "none" if serving_ssim is None else f"{serving_ssim:.3f}")
    return report
