#!/usr/bin/env bash
# Builds bscache into build/ (or $BUILD_DIR) with warnings as errors.
# Extra arguments go to the CMake configure step.
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${BUILD_DIR:-build}
cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=${BUILD_TYPE:-Release} -DBSCACHE_WERROR=ON "$@" >/dev/null
cmake --build "$build_dir" -j"$(nproc)"
