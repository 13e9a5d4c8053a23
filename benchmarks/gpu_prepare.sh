#!/usr/bin/env bash
# Prepare, on this CPU machine, what the GPU check needs on a lent machine that cannot reach the
# network (the `device` tool sends the working tree, and the folders named in `carry`):
#   .whl/       wheels of the packages its image lacks (pure Python: any Python 3 there)
#   .gpu_data/  MNIST's raw files, copied from $PYRO_GMVAE_DATA
# Both folders are git-ignored. Then, with a GPU lent, one call of the device tool:
#   run(command="bash benchmarks/gpu_device.sh", carry=[".whl", ".gpu_data"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
rm -rf .whl && mkdir -p .whl
# The versions tested here; pyro-ppl's other needs (torch, numpy, opt-einsum, tqdm) are there.
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl \
    "pyro-ppl==$("$PY" -c 'import pyro; print(pyro.__version__)')" pyro-api==0.1.2 \
    "umap-learn==$("$PY" -c 'import umap; print(umap.__version__)')" pynndescent==0.7.0
: "${PYRO_GMVAE_DATA:?set PYRO_GMVAE_DATA to the folder that holds MNIST/raw}"
mkdir -p .gpu_data/MNIST
rm -rf .gpu_data/MNIST/raw && cp -r "$PYRO_GMVAE_DATA/MNIST/raw" .gpu_data/MNIST/raw
du -sh .whl .gpu_data
