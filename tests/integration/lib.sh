# Shared helpers for integration tests: start real servers, wait for them
# to be ready by pidfile (no fixed sleeps), and clean up whatever happens.
# Source it; it sets `set -euo pipefail` and a cleanup trap.
set -euo pipefail

BSCACHE=${BSCACHE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/build/bscache}
TEST_TOOLS=${TEST_TOOLS:-$(dirname "$BSCACHE")}
T=$(mktemp -d "${TMPDIR:-/tmp}/bscache-test.XXXXXX")
PIDS=()

cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    kill -9 "$pid" 2>/dev/null || true
  done
  if ((rc != 0 && rc != 77)); then
    echo "---- logs of the failed test ($T) ----" >&2
    for f in "$T"/*.log; do
      [[ -f $f ]] || continue
      echo "== $f (warnings and errors, then the last lines)" >&2
      grep -E "warn|error|ERROR|Sanitizer" "$f" | head -n 40 >&2 || true
      tail -n 30 "$f" >&2
    done
  fi
  rm -rf "$T"
  exit "$rc"
}
trap cleanup EXIT

fail() { echo "FAIL: $*" >&2; exit 1; }
pass() { echo "ok: $*"; }
# skip REASON: CTest reports the test as skipped (exit 77), with the reason in its output.
skip() { echo "SKIP: $*"; exit 77; }

# wait_for_file PATH [SECONDS]: the readiness signal of every server we start.
wait_for_file() {
  local path=$1 limit=${2:-60}
  for _ in $(seq $((limit * 20))); do
    [[ -s $path ]] && return 0
    sleep 0.05
  done
  fail "timed out waiting for $path"
}

# start_nbdkit NAME ARGS...: nbdkit on $T/NAME.sock, ready on return.
start_nbdkit() {
  local name=$1; shift
  rm -f "$T/$name.sock" "$T/$name.pid"
  nbdkit -f -U "$T/$name.sock" -P "$T/$name.pid" "$@" >"$T/$name.log" 2>&1 &
  PIDS+=($!)
  wait_for_file "$T/$name.pid"
}

# start_bscache NAME ARGS...: bscache listening on $T/NAME.sock, ready on return.
# BSCACHE_DATA_PATH (set by the ".libnbd" variants of some tests) selects --data-path.
start_bscache() {
  local name=$1; shift
  rm -f "$T/$name.pid"
  "$BSCACHE" --unix "$T/$name.sock" --pidfile "$T/$name.pid" ${BSCACHE_DATA_PATH:+--data-path "$BSCACHE_DATA_PATH"} \
    "$@" >"$T/$name.log" 2>&1 &
  PIDS+=($!)
  wait_for_file "$T/$name.pid"
}

# stop_server NAME: SIGTERM the server started as NAME and wait for it to exit.
stop_server() {
  local pid
  pid=$(cat "$T/$1.pid")
  kill "$pid"
  for _ in $(seq 400); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.05; done
  fail "$1 (pid $pid) did not exit after SIGTERM"
}

uri() { echo "nbd+unix:///?socket=$T/$1.sock"; }

# nbdkit stats filter: count of one operation ("extents", "write", ...).
stats_count() {
  local file=$1 op=$2
  awk -v op="$op:" '$1 == op { print $2; found=1 } END { if (!found) print 0 }' "$file"
}

# qemu10_bin: the bin/ of qemu 10 fetched by scripts/qemu10.sh (or
# $QEMU10_PREFIX); skips the test when it is absent, fails if it is not qemu 10.
qemu10_bin() {
  local root bin version
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  bin=${QEMU10_PREFIX:-$root/.cache/qemu10}/bin
  [[ -x $bin/qemu-img ]] || skip "qemu 10 not fetched (scripts/qemu10.sh; it needs the Debian mirror)" >&2
  version=$("$bin/qemu-img" --version | head -1)
  [[ $version == *"version 10."* ]] || fail "$bin/qemu-img is not qemu 10: $version"
  echo "$bin"
}
