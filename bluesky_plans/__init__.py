"""ptychostream.bluesky_plans: ophyd devices and Bluesky plans for streaming ptychography.

    from ptychostream.bluesky_plans import spiral_ptycho_scan, continual_learning_plan, ...

See docs/bluesky.md. The demo lives in :mod:`ptychostream.bluesky_plans.demo`.
"""

from .continual import (
    ContinualLearner,
    call,
    continual_learning_plan,
    deploy,
    learn_from_scan,
    remote,
    report_decision,
    report_ssim,
    round_summary,
)
from .devices import (
    EdgeIOC,
    EpicsSpiralStage,
    SimMotor,
    SimPtychoDetector,
    SimSpiralStage,
)
from .live import LiveStitchedMap
from .plans import (
    configure_detector,
    prepare_ioc,
    ptycho_scan,
    resolve_step,
    spiral_path,
    spiral_ptycho_scan,
    wait_for_input,
    wait_for_ioc,
)
from .session import ScanRunEngine, make_run_engine

__all__ = [
    "ContinualLearner", "call", "continual_learning_plan", "deploy", "learn_from_scan", "remote",
    "report_decision", "report_ssim", "round_summary", "EdgeIOC", "EpicsSpiralStage", "SimMotor",
    "SimPtychoDetector", "SimSpiralStage", "configure_detector", "prepare_ioc", "ptycho_scan", "resolve_step",
    "spiral_path", "spiral_ptycho_scan", "wait_for_input", "wait_for_ioc", "ScanRunEngine",
    "make_run_engine", "LiveStitchedMap",
]
