#!/usr/bin/env bash
# Set-up from a bare Debian 12 machine: installs what is missing with apt, then builds with CMake.
# Usage: scripts/setup.sh [extra cmake -D options]
#        scripts/setup.sh --packages-only   (apt only, e.g. for scripts/check_format.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(build-essential cmake pkg-config ccache clang-format
          nlohmann-json3-dev libspdlog-dev libcli11-dev catch2
          libopenblas-openmp-dev libdnnl-dev libopenmpi-dev openmpi-bin
          python3-numpy python3-torch python3-matplotlib)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if [ "${1:-}" = "--packages-only" ]; then
  exit 0
fi

build_dir=${MOETRAIN_BUILD_DIR:-build}
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release "$@"
cmake --build "$build_dir" -j "$(nproc)"
echo "setup: built $build_dir/moetrain"
