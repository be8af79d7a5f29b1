#!/usr/bin/env bash
# Builds the libFuzzer target with clang and runs it for a bounded time
# (FUZZ_SECONDS, default 60) from the checked-in seed corpus. New inputs go to
# a scratch corpus; a crash leaves its input in build-fuzz/ and fails.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-60}
cmake -S . -B build-fuzz -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBSCACHE_FUZZ=ON \
  -DBSCACHE_TESTS=OFF >/dev/null
cmake --build build-fuzz --target fuzz_protocol -j"$(nproc)"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
build-fuzz/fuzz_protocol -max_total_time="$seconds" -print_final_stats=1 -artifact_prefix=build-fuzz/ \
  "$scratch" tests/fuzz/corpus 2>&1 | tail -n 12
