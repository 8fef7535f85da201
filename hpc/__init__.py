"""ptychostream.hpc: the HPC side of the loop (DESIGN.md, "HPC side").

Functions take paths and plain values and return paths and plain values, importing heavy
libraries inside, so they run the same in a local process pool and on a Globus Compute
endpoint::

    reconstruct(scan) -> recon.h5 ; make_labels(scan, recon) -> labels.h5
    corpus_append(corpus, labels) ; train(corpus, warm_start) -> model.pt + model.onnx
    validate(model, scan, recon) -> SSIM ; ContinualPolicy decides what to run next
    reconstruct_many(scans) (several at once on one GPU) ; compare_reconstructions(scan, a, b)
"""

from .compare import compare_reconstructions
from .corpus import Corpus, CorpusError, corpus_append
from .executors import get_executor, load_config
from .labels import align_phase, make_labels, read_labels
from .loop import hpc_round
from .policy import ContinualPolicy, Decision
from .reconstruct import (
    Reconstruction,
    ReconstructionError,
    read_reconstruction,
    reconstruct,
    reconstruct_many,
)
from .train import TrainingError, train
from .transfer import transfer_files
from .validate import validate

__all__ = [
    "Corpus", "CorpusError", "corpus_append", "get_executor", "load_config", "hpc_round",
    "align_phase", "make_labels", "read_labels", "ContinualPolicy", "Decision", "Reconstruction",
    "ReconstructionError", "read_reconstruction", "reconstruct", "reconstruct_many", "TrainingError", "train",
    "compare_reconstructions",
    "transfer_files", "validate",
]
