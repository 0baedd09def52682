#!/usr/bin/env bash
# Install everything aal needs on a fresh Debian machine: the Fashion-MNIST system package
# (official IDX files in /usr/share/datasets/fashion-mnist/), the CPU build of torch 2.13.0
# (a looser pin pulls several GB of CUDA wheels), aal itself with its test extras, and torchattacks
# for the cross-check tests (without its torchvision dependency, see below).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get install -y -q dataset-fashion-mnist \
        || { $SUDO apt-get update -q && $SUDO apt-get install -y -q dataset-fashion-mnist; }
fi

python3 -m pip install -q --disable-pip-version-check torch==2.13.0
python3 -m pip install -q --disable-pip-version-check -e ".[test]"
# torchattacks, the independent implementation the cross-check tests compare aal's attacks and
# suite with. Its metadata requires torchvision, which pip would resolve to a wheel that does
# not work with this torch build (and pull CUDA packages); the attacks never import it. So it is
# installed without its declared dependencies, plus what it really imports at runtime (numpy,
# scipy, tqdm; ``requests`` is declared but never imported). tests/test_install.py checks that
# importing it loads no torchvision.
python3 -m pip install -q --disable-pip-version-check numpy scipy tqdm
python3 -m pip install -q --disable-pip-version-check --no-deps torchattacks==3.5.1
# pyenv installs console scripts behind shims that exist only after a rehash
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
