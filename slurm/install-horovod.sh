#!/usr/bin/env bash
# Build Horovod 0.28.1 (the last release) against the installed TensorFlow, for the
# optional `distribute.strategy: horovod` engine.
#
# Facts this script works around (TensorFlow 2.21, Keras 3):
#  * the build must see the installed TensorFlow: pip --no-build-isolation;
#  * horovod/tensorflow/xla_mpi_ops.cc includes an XLA header that has moved, so it is
#    dropped from horovod/tensorflow/CMakeLists.txt (XLA ops are not used by hpcjobs);
#  * it needs Open MPI's headers (Debian: libopenmpi-dev openmpi-bin) and cmake.
# Usage: bash slurm/install-horovod.sh   (as root it apt-installs the MPI headers if missing)
set -euo pipefail
VERSION=0.28.1
if python -c "import horovod.tensorflow" 2>/dev/null; then
  echo "horovod already installed: $(python -c 'import horovod; print(horovod.__version__)')"
  exit 0
fi
if ! command -v mpicc >/dev/null || ! command -v cmake >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      libopenmpi-dev openmpi-bin cmake g++ >/dev/null
  else
    echo "install Open MPI headers (libopenmpi-dev), mpicc and cmake first" >&2
    exit 2
  fi
fi
# The built wheel is kept per TensorFlow and Python version (a rebuild takes minutes):
# $HPCJOBS_WHEEL_CACHE, default ~/.cache/hpcjobs/wheels. A fresh machine builds it once.
tf_version=$(python -c "import tensorflow as tf; print(tf.__version__)")
py_tag=$(python -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
cache="${HPCJOBS_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hpcjobs/wheels}/tf-$tf_version-$py_tag-$(uname -m)"
python -m pip install -q packaging cloudpickle psutil pyyaml cffi
wheel=$(ls "$cache"/horovod-$VERSION-*.whl 2>/dev/null | head -n 1 || true)
if [ -n "$wheel" ] && python -m pip install -q --no-deps "$wheel" && python -c "import horovod.tensorflow" 2>/dev/null; then
  echo "horovod $VERSION installed from the wheel built earlier: $wheel"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -m pip download -q --no-deps --no-binary :all: -d "$work" "horovod==$VERSION"
tar -xzf "$work"/horovod-$VERSION.tar.gz -C "$work"
src="$work/horovod-$VERSION"
sed -i '/xla_mpi_ops.cc/d' "$src/horovod/tensorflow/CMakeLists.txt"
HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
HOROVOD_WITHOUT_GLOO=${HOROVOD_WITHOUT_GLOO:-0} HOROVOD_CPU_OPERATIONS=MPI \
MAKEFLAGS="-j$(nproc)" python -m pip wheel --no-build-isolation --no-deps -v -w "$work/wheel" "$src" \
  > "$work/build.log" 2>&1 || {
  tail -50 "$work/build.log" >&2
  exit 1
}
python -m pip install -q --no-deps "$work"/wheel/horovod-*.whl
mkdir -p "$cache" && cp "$work"/wheel/horovod-*.whl "$cache"/
python -c "import horovod.tensorflow as hvd; print('horovod', hvd.__version__ if hasattr(hvd, '__version__') else '', 'built with MPI:', hvd.mpi_built())"
