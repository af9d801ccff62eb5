#!/usr/bin/env bash
# Installs what the test suite needs on a fresh machine: system packages (as root, with
# apt-get: Open MPI for mpi4py/mpirun, Debian's Fashion-MNIST, Slurm and munge for the
# local cluster), the Python package with its test extras, and Horovod (built against
# the installed TensorFlow by slurm/install-horovod.sh; a few minutes, once).
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs=(openmpi-bin libopenmpi-dev dataset-fashion-mnist slurm-wlm munge cmake g++)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "warning: missing ${missing[*]} (not root): the tests that need them are skipped" >&2
  fi
fi
python -m pip install -q -e ".[cpu,test]"
# model.arch: kerashub:PATH (README, "KerasHub presets"): keras-hub without its tensorflow-text, which would
# install the full tensorflow wheel over tensorflow-cpu
python -m pip install -q --no-deps 'keras-hub>=0.32,<0.33' regex tokenizers sentencepiece 'kagglehub!=1.0.1' kagglesdk==0.1.28
if [ "$(id -u)" = 0 ] || [ -n "${CI:-}" ]; then
  bash slurm/install-horovod.sh
fi
