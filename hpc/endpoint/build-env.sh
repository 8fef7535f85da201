#!/usr/bin/env bash
# Build the HPC endpoint's Python environment in one command: Tike (numpy 1.x, CuPy for CUDA 12)
# beside ptychostream without the IOC extras, and the Globus Compute endpoint.
#
#   hpc/endpoint/build-env.sh [ENV_DIR]        # default: ~/envs/ptychostream-tike
#   PYTHON=python3.11 hpc/endpoint/build-env.sh /eagle/MY_PROJECT/envs/ptychostream-tike
#
# Then name ENV_DIR in the endpoint's config.yaml (worker_init: source ENV_DIR/bin/activate).
# pty-chi needs numpy>=2.1, so it is not installed here; Tike's and pty-chi's reconstructions of
# the same scan are compared by file with `ptychostream-hpc compare` (docs/hpc.md).
set -euo pipefail
ENV_DIR=${1:-$HOME/envs/ptychostream-tike}
PYTHON=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

"$PYTHON" - <<'PY'
import sys
if not ((3, 10) <= sys.version_info[:2] <= (3, 12)):
    sys.exit(f"Python {sys.version.split()[0]}: numpy 1.26 wheels need Python 3.10-3.12")
PY
"$PYTHON" -m venv "$ENV_DIR"
PIP=("$ENV_DIR/bin/python" -m pip)
"${PIP[@]}" install --upgrade pip
"${PIP[@]}" install -r "$HERE/requirements-tike.txt"
# tike asks for "cupy" (the source distribution); the binary cupy-cuda12x above provides it
"${PIP[@]}" install --no-deps tike==0.26.0
# ptychostream itself: its base requirements are pinned above; no IOC, Bluesky or pty-chi extras
"${PIP[@]}" install --no-deps "$REPO"
# checked from outside the repository: from its root the source folder ptychostream/ (which
# lacks the hpc subpackage: setup.cfg maps it from hpc/) would shadow what was installed
cd "$ENV_DIR"
"$ENV_DIR/bin/python" - <<'PY'
import numpy, tike, ptychostream.hpc
assert numpy.__version__.startswith("1."), numpy.__version__
print(f"ok: numpy {numpy.__version__}, tike {tike.__version__}, ptychostream.hpc from {ptychostream.hpc.__file__}")
PY
echo "environment ready: $ENV_DIR"
