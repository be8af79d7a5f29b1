#!/usr/bin/env bash
# Static checks: formatting, layering, and clang-tidy (the checked-in
# .clang-tidy, every finding an error) over the project's own sources, using
# the compile commands of an existing build (BUILD_DIR, default build/).
# Runs clang-tidy on TIDY_JOBS files at once (default 2), for at most
# TIDY_TIMEOUT seconds (default 1800), which fails the check when reached.
# --no-tidy: formatting and layering only (what scripts/test.sh, and so CI,
# runs: clang-tidy takes about 7 of a 2-core machine's minutes; run the full
# check before committing).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
tidy=1
if [[ ${1:-} == --no-tidy ]]; then tidy=0; fi
build_dir=${BUILD_DIR:-build}
jobs=${TIDY_JOBS:-2}
limit=${TIDY_TIMEOUT:-1800}

scripts/check-format.sh
scripts/check-layering.sh
((tidy)) || exit 0

database=$build_dir/compile_commands.json
[[ -f $database ]] || { echo "check: $database missing: build first (scripts/build.sh)" >&2; exit 1; }
# A unity build's compile commands name its generated unity files, not the sources.
if grep -q '^BSCACHE_UNITY:BOOL=ON$' "$build_dir/CMakeCache.txt" 2>/dev/null; then
  echo "check: $build_dir is a unity build (BSCACHE_UNITY, as scripts/test.sh makes it): clang-tidy needs" \
    "one without (scripts/build.sh -DBSCACHE_UNITY=OFF, or another BUILD_DIR)" >&2
  exit 1
fi
sources=()
while IFS= read -r file; do
  relative=${file#"$root"/}
  [[ $relative =~ ^(cache|policy|proxy|tests|bench)/ ]] || continue
  sources+=("^$file\$")
done < <(jq -r '.[].file' "$database" | sort -u)
((${#sources[@]} > 0)) || { echo "check: no sources in $database" >&2; exit 1; }

echo "clang-tidy: ${#sources[@]} files, $jobs at a time, at most ${limit}s" >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
rc=0
timeout "$limit" run-clang-tidy -quiet -p "$build_dir" -j "$jobs" "${sources[@]}" >"$log" 2>&1 || rc=$?
if ((rc == 124)); then
  echo "check: clang-tidy did not finish in ${limit}s (raise TIDY_TIMEOUT on a slow machine)" >&2
  exit 1
fi

# run-clang-tidy exits non-zero both for findings and for files it could not
# check: the log tells them apart. Headers reached through a layer's include root
# (BUILD_DIR/layers/<lib>/...) are mapped back to their path in the source tree.
findings=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -E '^[^ ]+:[0-9]+:[0-9]+: (error|warning): ' |
  sed -E "s#^.*/layers/bscache_[a-z_]+/##; s#^$root/##" | sort -u || true)
if [[ -n $findings ]]; then
  printf '%s\n' "$findings" >&2
  echo "check: $(wc -l <<<"$findings") clang-tidy findings" >&2
  exit 1
fi
if ((rc != 0)) && grep -qE 'terminated by signal|Found compiler error|Error while processing' "$log"; then
  grep -E 'terminated by signal|Found compiler error|Error while processing' "$log" >&2
  echo "check: clang-tidy failed on a file" >&2
  exit 1
fi
echo "check: clang-format, layering and clang-tidy clean"
