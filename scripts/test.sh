#!/usr/bin/env bash
# Installs dependencies, builds, runs the static checks (scripts/check.sh:
# clang-format, layering, clang-tidy) and every test (unit and integration)
# with CTest. Then the same suite again under AddressSanitizer + UBSan.
# Usage: scripts/test.sh [--no-sanitize] [ctest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

sanitize=1
if [[ ${1:-} == --no-sanitize ]]; then sanitize=0; shift; fi

scripts/deps.sh
BUILD_DIR=build scripts/build.sh
BUILD_DIR=build scripts/check.sh
(cd build && ctest --output-on-failure --timeout 300 -j2 "$@")

echo "== fuzzing the handshake and request decoder =="
FUZZ_SECONDS=${FUZZ_SECONDS:-60} scripts/fuzz.sh

if ((sanitize)); then
  echo "== again under AddressSanitizer + UBSan =="
  BUILD_DIR=build-asan BUILD_TYPE=Debug scripts/build.sh -DBSCACHE_SANITIZE=ON
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
  (cd build-asan && ctest --output-on-failure --timeout 600 -j2 "$@")
fi
