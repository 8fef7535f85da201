#!/usr/bin/env bash
# Run HERE (the 2-core development machine, with network) before a GPU session: builds this
# project's wheel and downloads, for the device machine's Python 3.12, the wheels its image
# lacks, into .whl/ (ignored by git; name it in the device tool's `carry`). Then, in ONE device
# call (the whole session has 15 minutes of device time):
#
#   run(command="bash benchmarks/gpu/run.sh base", carry=[".whl"], timeout_s=600)    # ~8 min
#   run(command="bash benchmarks/gpu/run.sh checks", carry=[".whl"], timeout_s=600)  # ~8 min
#
# Before that, try it here at toy size (a Python 3.12 with the image's packages first on PATH):
#   OUT=/tmp/gpu-out bash benchmarks/gpu/run.sh rehearse
# `base` trains and benchmarks the base model (benchmarks/train_base_model.py); `checks` runs
# the speed benchmarks (inference, refinement, pipeline, HPC). Each packs its results into
# $OUT/*.tar.gz (the tool returns at most 8 files); unpack here, and ship a base model with
#   .venv/bin/python benchmarks/train_base_model.py --install-from <unpacked folder>/base
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
PY=${PYTHON:-.venv/bin/python}
$PY -m pip wheel -q --no-deps --no-build-isolation -w .whl .
# what the image lacks (its package list: the device tool's KINDS.md), pinned to what runs here
need=(xraydb sqlalchemy greenlet platformdirs loky ptychi pydantic pydantic-core
      annotated-types typing-inspection p4p pvxslibs epicscorelibs setuptools-dso ply pvapy
      lz4 blosc bitshuffle)
for name in "${need[@]}"; do
  ver=$($PY -m pip show "$name" 2>/dev/null | awk '/^Version:/ {print $2}' || true)
  spec="$name${ver:+==$ver}"
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 -d .whl "$spec" 2>/dev/null \
  || $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      -d .whl "$name" \
  || echo "could not fetch a cp312 wheel of $name: the step that needs it will say so"
done
du -sh .whl
ls .whl
