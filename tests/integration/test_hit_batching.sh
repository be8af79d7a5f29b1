#!/usr/bin/env bash
# Pipelined cache hits are answered in batches: one client sending bursts of
# 16 REQ_ONE block-status requests costs bscache about one read, one write
# and one wait per burst (counted with strace), where answering request by
# request costs 16 writes. Every reply is checked to be a success.
source "$(dirname "$0")/lib.sh"
here=$(dirname "$0")
command -v strace >/dev/null || skip "strace is not installed"

"$here/make_extents.sh" $((1 << 30)) 800 5 >"$T/extents"
start_nbdkit up --filter=extentlist null size=1G extentlist="$T/extents"
start_bscache bs --upstream "$(uri up)"

bursts=100 depth=16
read -r sends receives polls < <(PYTHONPATH=$here python3 "$here/hit_batching.py" "$T/bs.sock" "$(cat "$T/bs.pid")" \
  $bursts $depth) || fail "the client failed"
echo "$bursts bursts of $depth hits: $sends writes, $receives reads, $polls waits"
# One write per burst, with room for a burst split across two reads (and a
# stray write of the loop's own); request by request it would be 16.
((sends <= bursts * 2)) || fail "$sends writes for $bursts bursts of $depth: replies are not batched"
((receives <= bursts * 3)) || fail "$receives reads for $bursts bursts of $depth: requests are not read together"
((polls <= bursts * 3)) || fail "$polls waits for $bursts bursts of $depth"
pass "batched: $(awk -v s="$sends" -v r="$receives" -v p="$polls" -v n=$((bursts * depth)) \
  'BEGIN { printf "%.2f system calls per hit", (s + r + p) / n }')"
