#!/usr/bin/env bash
# What extended headers upstream change (#22), before against after, in
# front of qemu-nbd 10 (scripts/qemu10.sh):
#  1. nbdcopy of a 1 GiB image full of data through bscache to null:, runs
#     interleaved, median wall time of each;
#  2. one 8 GiB zero from libnbd >= 1.18's nbdsh (an extended-headers client)
#     through bscache: how many WRITE_ZEROES commands qemu-nbd received (its
#     trace) and the median wall time.
# usage: bench/upstream_ext.sh BEFORE_BSCACHE AFTER_BSCACHE [RUNS]
# (LIBNBD_NEW_PREFIX: the newer libnbd, default .cache/libnbd-new.)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
before=$1 after=$2 runs=${3:-5}
qemu=${QEMU10_PREFIX:-$root/.cache/qemu10}/bin
nbdsh=${LIBNBD_NEW_PREFIX:-$root/.cache/libnbd-new}/bin/nbdsh
T=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.5; rm -rf "$T"' EXIT

wait_for() { for _ in $(seq 400); do [[ -s $1 ]] && return; sleep 0.05; done; echo "timeout: $1" >&2; exit 1; }

head -c 1G /dev/urandom >"$T/data.raw"
truncate -s 8G "$T/zero.raw"
for image in data zero; do
  "$qemu/qemu-nbd" -t -e 16 -f raw -k "$T/$image.sock" --pid-file="$T/$image.pid" \
    -T nbd_co_receive_request_decode_type "$T/$image.raw" >"$T/$image.log" 2>&1 &
  pids+=($!)
  wait_for "$T/$image.pid"
done

# start NAME BINARY IMAGE: bscache on $T/NAME.sock in front of qemu-nbd IMAGE.
start() {
  rm -f "$T/$1.pid"
  "$2" --unix "$T/$1.sock" --pidfile "$T/$1.pid" --exports single \
    --upstream "nbd+unix:///?socket=$T/$3.sock" >"$T/$1.log" 2>&1 &
  pids+=($!)
  wait_for "$T/$1.pid"
}
start before_data "$before" data
start after_data "$after" data
start before_zero "$before" zero
start after_zero "$after" zero

median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
seconds() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null; t1=$(date +%s.%N); echo "$t1 - $t0" | bc; }

for _ in $(seq "$runs"); do
  for which in before after; do
    seconds nbdcopy "nbd+unix:///?socket=$T/${which}_data.sock" null: >>"$T/$which.copy"
  done
done
zeroes() { grep -c 'type = 6 (write zeroes)' "$T/zero.log" || true; }
for which in before after; do
  n0=$(zeroes)
  for _ in $(seq "$runs"); do
    seconds "$nbdsh" -u "nbd+unix:///?socket=$T/${which}_zero.sock" -c 'h.zero(8 << 30, 0)' >>"$T/$which.zero"
  done
  echo "$which: $((($(zeroes) - n0) / runs)) WRITE_ZEROES upstream per 8 GiB zero" >>"$T/counts"
done
echo "nbdcopy 1 GiB of data from qemu-nbd 10 through bscache, median of $runs (s):"
b=$(median <"$T/before.copy") a=$(median <"$T/after.copy")
echo "  before $b  after $a  after/before $(echo "scale=3; $a / $b" | bc)"
echo "  runs before: $(tr '\n' ' ' <"$T/before.copy")"
echo "  runs after:  $(tr '\n' ' ' <"$T/after.copy")"
echo "nbdsh zero of 8 GiB through bscache, median of $runs (s):"
b=$(median <"$T/before.zero") a=$(median <"$T/after.zero")
echo "  before $b  after $a  after/before $(echo "scale=3; $a / $b" | bc)"
cat "$T/counts"
grep -h "own client" "$T/before_data.log" "$T/after_data.log" | sed 's/^/  log: /' || true
