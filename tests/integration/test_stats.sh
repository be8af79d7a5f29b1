#!/usr/bin/env bash
# Statistics: the stats file after --run, SIGUSR1 rewrites, and /metrics as
# valid Prometheus text while traffic runs.
source "$(dirname "$0")/lib.sh"
here=$(dirname "$0")
py=/usr/bin/python3

"$here/make_extents.sh" $((1 << 30)) 800 3 >"$T/extents"
start_nbdkit up --filter=stats --filter=extentlist null size=1G extentlist="$T/extents" statsfile="$T/upstream.stats"

# Captive mode: the stats file is written when the command ends.
"$BSCACHE" --upstream "$(uri up)" --stats-file "$T/run.json" --run 'qemu-img map --output=json "$uri"' \
  >"$T/run.map" 2>"$T/run.log" || fail "--run failed"
jq -e . "$T/run.json" >/dev/null || fail "stats file does not parse"
requests=$(jq '.client.requests.block_status' "$T/run.json")
hits=$(jq '.block_status.hits' "$T/run.json")
misses=$(jq '.block_status.misses' "$T/run.json")
((requests > 100)) || fail "expected many block-status requests, got $requests"
((hits + misses == requests)) || fail "hits $hits + misses $misses != requests $requests"
jq -e '.block_status.hit_rate > 0.9 and .block_status.hit_rate <= 1' "$T/run.json" >/dev/null || fail "hit rate"
for key in uptime_seconds policy client.connections_total client.requests.read upstream.requests.block_status \
  upstream.errors upstream.reconnects cache.extents cache.memory_bytes cache.evictions cache.prefetches; do
  jq -e ".$key != null" "$T/run.json" >/dev/null || fail "stats file lacks $key"
done
pass "stats file after --run: $requests requests, $hits hits, $misses misses"

# A long-running proxy with a metrics endpoint.
start_bscache bs --upstream "$(uri up)" --stats-file "$T/live.json" --metrics 127.0.0.1:0 --log-level debug
endpoint=$(grep -o 'metrics on http://[^ ]*' "$T/bs.log" | head -1 | sed 's/metrics on //')
[[ -n $endpoint ]] || fail "no metrics endpoint in the start-up log"
qemu-img map --output=json "$(uri bs)" >/dev/null &
mapper=$!
curl -sf "$endpoint" >"$T/during.prom" || fail "GET /metrics during traffic"
wait "$mapper"
curl -sf "$endpoint" >"$T/metrics.prom" || fail "GET /metrics"
$py "$here/prom_check.py" <"$T/during.prom" >/dev/null || fail "metrics during traffic do not parse"
$py "$here/prom_check.py" <"$T/metrics.prom" >"$T/samples.json" || fail "metrics do not parse"
jq -e '."bscache_block_status_hits_total" > 0' "$T/samples.json" >/dev/null || fail "no hits in metrics"
jq -e '."bscache_upstream_requests_total{op=\"block_status\"}" >= 1' "$T/samples.json" >/dev/null \
  || fail "no upstream block-status count"
jq -e '."bscache_upstream_request_duration_seconds_count{op=\"block_status\"}" >= 1' "$T/samples.json" >/dev/null \
  || fail "no latency histogram samples"
curl -s -o /dev/null -w '%{http_code}' "${endpoint%/metrics}/other" | grep -q 404 || fail "unknown path is not 404"
pass "/metrics parses as Prometheus text"

# SIGUSR1 rewrites the stats file while a client is connected.
rm -f "$T/live.json"
qemu-io -f raw -c 'read 0 64k' -c 'read 64k 64k' "$(uri bs)" >/dev/null
kill -USR1 "$(cat "$T/bs.pid")"
wait_for_file "$T/live.json" 10
jq -e '.client.requests.read >= 2' "$T/live.json" >/dev/null || fail "SIGUSR1 stats lack the reads"
qemu-img map --output=json "$(uri bs)" >/dev/null || fail "proxy broken after SIGUSR1"
pass "SIGUSR1 rewrites the stats file"
