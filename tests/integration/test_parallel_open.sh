#!/usr/bin/env bash
# An export's upstream connections open side by side: after the first (whose
# answers say how many more upstream allows), the others' handshakes overlap.
# Upstream here takes 1 s to open each connection (nbdkit's delay filter), so
# four connections opened one after another keep bscache from listening for
# 4 s; side by side, about 2 s.
source "$(dirname "$0")/lib.sh"

start_nbdkit up --filter=delay memory 16M delay-open=1
t0=$(date +%s.%N)
# Single mode opens the export before listening: the pidfile says when it did.
start_bscache bs --upstream "$(uri up)" --exports single --upstream-connections 4 --stats-file "$T/bs.json"
t1=$(date +%s.%N)
elapsed=$(echo "$t1 - $t0" | bc -l)
grep -q "16777216 bytes, contexts: base:allocation, 4 connections)" "$T/bs.log" \
  || fail "not 4 upstream connections: $(cat "$T/bs.log")"
# 1 s for the first, 1 s for the other three together, and slack for a loaded machine; in turn it is 4 s.
(($(echo "$elapsed < 3.5" | bc -l))) || fail "opening 4 upstream connections took ${elapsed}s: one after another?"
pass "4 upstream connections with a 1 s open each were up in ${elapsed}s"

head -c $((1 << 20)) /dev/urandom >"$T/a"
nbdcopy "$T/a" "$(uri bs)" || fail "nbdcopy in through bscache"
nbdcopy "$(uri up)" "$T/out" || fail "nbdcopy out direct"
cmp -n $((1 << 20)) "$T/a" "$T/out" || fail "the bytes written through bscache did not land"
stop_server bs
jq -e '.upstream.writes_spliced > 0' "$T/bs.json" >/dev/null || fail "no WRITE went over the wire connections"
pass "the connections opened side by side carry data"
