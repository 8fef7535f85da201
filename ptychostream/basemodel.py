"""The shipped base model: a PtychoNN 2.0 state dict trained on the simulated experiment.

``benchmarks/train_base_model.py --install`` writes it (with the record of its recipe and
figures) into the package data folder ``ptychostream/data/``; ``--model builtin`` (IOC,
benchmarks, demo) serves it. Until a GPU run has shipped one, asking for it raises
:class:`~ptychostream.model.ModelError` saying how to make it.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ptychostream.modelfile import ModelError

#: the name that selects the shipped model wherever a model path is asked for
BUILTIN = "builtin"
STATE_DICT_NAME = "ptychonn2_base.pt"
RECIPE_NAME = "ptychonn2_base.recipe.json"


def data_dir() -> Path:
    """The package data folder (inside the installed package, or the source tree)."""
    return Path(str(resources.files("ptychostream"))) / "data"


def builtin_model_path() -> Path:
    """Path of the shipped state dict; ModelError when none is shipped yet."""
    path = data_dir() / STATE_DICT_NAME
    if not path.is_file():
        raise ModelError(
            f"no built-in base model is shipped ({path} does not exist): train one on a GPU with "
            "'python benchmarks/train_base_model.py --out DIR --install', or pass a model file"
        )
    return path


def builtin_model_bytes() -> bytes:
    """The shipped state dict's bytes (what a ``$(P)NN:Model`` write would carry)."""
    return builtin_model_path().read_bytes()


def builtin_recipe() -> dict:
    """The record of how the shipped model was made (parameters, versions, figures); {} if none."""
    path = data_dir() / RECIPE_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def resolve_model(spec: str | Path) -> Path:
    """A model argument as a path: ``"builtin"`` is the shipped model, anything else a file."""
    if str(spec) == BUILTIN:
        return builtin_model_path()
    path = Path(spec)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    return path
