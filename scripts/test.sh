#!/usr/bin/env bash
# Installs dependencies, builds, runs the static checks that CI runs
# (scripts/check.sh --no-tidy: clang-format, layering; the full
# scripts/check.sh adds clang-tidy) and every test (unit and integration)
# with CTest. Then the same suite again under AddressSanitizer + UBSan, and
# under ThreadSanitizer (upstream connections run on their own threads) with
# bscache built against a newer libnbd (Debian 13's, see below); the
# sanitizer passes skip the tests of the tooling (label "tooling": the
# benchmark harness, the Debian package).
# Usage: scripts/test.sh [--no-sanitize] [ctest args...]  (--no-sanitize skips both sanitizer passes,
# and so the newer libnbd's)
# CTest runs CTEST_JOBS tests at once (default 4 on any machine: most
# integration tests wait on servers and timers more than they compute; on
# this project's 2-core VM -j4 took the suite from 128 s to 72 s).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${CTEST_JOBS:-4}

sanitize=1
if [[ ${1:-} == --no-sanitize ]]; then sanitize=0; shift; fi

# Seconds per phase, printed at the end (and on failure), to keep CI's time in view.
phases=()
phase_start=$SECONDS
phase() { phases+=("$(printf '%5d s  %s' $((SECONDS - phase_start)) "$1")"); phase_start=$SECONDS; }
report_phases() {
  echo "== time per phase =="; printf '%s\n' "${phases[@]}"; echo "total: $SECONDS s"
  local pid  # work for later passes that a failure cut short
  for pid in "${bg_pid[@]}"; do pkill -P "$pid" 2>/dev/null; kill "$pid" 2>/dev/null; done
  return 0
}
declare -A bg_pid=()
trap report_phases EXIT

scripts/deps.sh
phase "dependencies"

# What the later passes need is prepared while the earlier ones run: the
# fetches (network and unpacking) beside the first build, and each sanitizer
# build beside the test pass before it, at the lowest CPU priority so the
# tests, which wait on servers and timers more than they compute, keep the
# CPU they use. On a 2-core machine this takes CI from about 40 minutes
# (every phase in turn) to under 25. Their output goes to build-logs/ and is
# printed if they fail.
mkdir -p build-logs
background() {  # NAME COMMAND...: runs COMMAND (a function too) niced, output to build-logs/NAME.log
  local name=$1; shift
  (renice -n 19 -p "$BASHPID" >/dev/null && "$@") >"build-logs/$name.log" 2>&1 &
  bg_pid[$name]=$!
}
finish() {  # NAME: waits for it; its status, its log printed if it failed
  local name=$1 status=0
  wait "${bg_pid[$name]}" || status=$?
  unset "bg_pid[$name]"
  if ((status != 0)); then echo "== $name failed ($status) ==" >&2; tail -n 60 "build-logs/$name.log" >&2; fi
  return "$status"
}
# A second qemu for the interop tests (qemu 10 from bookworm-backports, in a
# private prefix); without it test_qemu10 reports itself skipped.
background qemu10 timeout 300 scripts/qemu10.sh
# The ThreadSanitizer pass runs with bscache built against a newer libnbd
# (1.22 from Debian 13's source in a private prefix, scripts/libnbd-new.sh),
# so the whole suite runs once against each: Debian 12's 1.14 in the plain
# and ASan passes, 1.22 there, with the 64-bit block-status windows its CMake
# feature check turns on. One build instead of a fourth. If the source cannot
# be fetched, that pass uses 1.14 and says so.
((sanitize)) && background libnbd-new timeout 900 scripts/libnbd-new.sh

# Whole builds, so each library is compiled as one translation unit (see
# BSCACHE_UNITY in CMakeLists.txt: about half the CPU).
unity=-DBSCACHE_UNITY=ON
BUILD_DIR=build scripts/build.sh $unity
phase "build"
BUILD_DIR=build scripts/check.sh --no-tidy
phase "static checks"
finish qemu10 || echo "qemu 10 could not be fetched: test_qemu10 will be skipped" >&2
phase "qemu 10 (what was left of it)"

sanitizer_builds() {
  BUILD_DIR=build-asan BUILD_TYPE=Debug scripts/build.sh -DBSCACHE_SANITIZE=ON $unity
  cmake -S . -B build-fuzz -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBSCACHE_FUZZ=ON \
    -DBSCACHE_TESTS=OFF $unity >/dev/null
  cmake --build build-fuzz --target fuzz_protocol -j"$(nproc)"
}
((sanitize)) && background asan-build sanitizer_builds
(cd build && ctest --output-on-failure --timeout 300 -j"$jobs" "$@")
phase "tests"

echo "== fuzzing the handshake and request decoder =="
if ((sanitize)); then finish asan-build; phase "ASan and fuzz builds (what was left of them)"; fi
FUZZ_SECONDS=${FUZZ_SECONDS:-30} scripts/fuzz.sh
phase "fuzzing"

if ((sanitize)); then
  libnbd_new_status=0
  finish libnbd-new || libnbd_new_status=$?
  if ((libnbd_new_status == 75)); then
    echo "== libnbd from Debian 13 could not be fetched: bscache is NOT tested against a newer libnbd ==" >&2
  else
    ((libnbd_new_status == 0)) || exit 1
    libnbd_new_prefix=$(scripts/libnbd-new.sh)  # built: only prints where
    export PKG_CONFIG_PATH=$libnbd_new_prefix/lib/pkgconfig
    echo "== libnbd $(pkg-config --modversion libnbd) for the ThreadSanitizer build =="
  fi
  # Line tables only (-g1, all a report's stacks need): about 12% less CPU
  # than -g. (-O1 would save 40%, but GCC 12 then reports Asio's coroutine
  # frames as mismatched new/delete.)
  tsan_build() {
    BUILD_DIR=build-tsan BUILD_TYPE=RelWithDebInfo scripts/build.sh -DBSCACHE_TSAN=ON $unity \
      "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O2 -g1 -DNDEBUG"
  }
  background tsan-build tsan_build
  unset PKG_CONFIG_PATH

  echo "== again under AddressSanitizer + UBSan =="
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
  (cd build-asan && ctest --output-on-failure --timeout 600 -j"$jobs" -LE tooling "$@")
  phase "ASan tests"
  unset ASAN_OPTIONS

  echo "== again under ThreadSanitizer, against a newer libnbd =="
  finish tsan-build
  if ((libnbd_new_status == 0)); then
    grep -q '^BSCACHE_HAVE_NBD_BLOCK_STATUS_64:INTERNAL=1$' build-tsan/CMakeCache.txt ||
      { echo "build-tsan: the feature check did not find nbd_aio_block_status_64 in libnbd 1.22" >&2; exit 1; }
  fi
  phase "TSan build (what was left of it)"
  export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions=$PWD/tests/tsan.supp"
  (cd build-tsan && ctest --output-on-failure --timeout 600 -j"$jobs" -LE tooling "$@")
  phase "TSan tests"
fi
