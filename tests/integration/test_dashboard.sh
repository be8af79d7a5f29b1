#!/usr/bin/env bash
# The Grafana dashboard (contrib/grafana/bscache.json) queries only metrics
# that bscache's /metrics serves, and covers what the README promises: hit
# ratio, calls saved, requests and errors per op, latency quantiles, cache
# size and memory, evictions, reconnects.
source "$(dirname "$0")/lib.sh"
dashboard=$(cd "$(dirname "$0")/../.." && pwd)/contrib/grafana/bscache.json

jq -e '.uid == "bscache" and (.panels | length) > 10' "$dashboard" >/dev/null || fail "not a dashboard"
jq -e '[.panels[] | select(.type != "row") | (.targets | length) > 0 and .datasource != null] | all' "$dashboard" \
  >/dev/null || fail "a panel without queries or datasource"
jq -r '.. | objects | (.expr?, .query.query?) | strings' "$dashboard" >"$T/queries"
grep -oE 'bscache_[a-z_]+' "$T/queries" | sort -u >"$T/names"
queried=$(wc -l <"$T/names")
((queried >= 20)) || fail "only $queried metric names in the dashboard's queries"

start_nbdkit up memory 16M
start_bscache bs --upstream "$(uri up)" --metrics 127.0.0.1:0
endpoint=$(grep -o 'metrics on http://[^ ]*' "$T/bs.log" | head -1 | sed 's/metrics on //')
qemu-img map --output=json "$(uri bs)" >/dev/null
curl -sf "$endpoint" >"$T/metrics.prom" || fail "GET /metrics"
missing=()
while read -r name; do
  grep -qE "^$name[{ ]" "$T/metrics.prom" || missing+=("$name")
done <"$T/names"
((${#missing[@]} == 0)) || fail "the dashboard queries metrics /metrics does not serve: ${missing[*]}"
pass "all $queried metric names the dashboard queries are served by /metrics"

for needed in bscache_block_status_hit_ratio bscache_upstream_calls_saved_total bscache_client_requests_total \
  bscache_client_errors_total bscache_upstream_errors_total bscache_upstream_request_duration_seconds_bucket \
  bscache_cache_extents bscache_cache_memory_bytes bscache_cache_evictions_total bscache_upstream_reconnects_total; do
  grep -qx "$needed" "$T/names" || fail "the dashboard does not show $needed"
done
grep -q 'histogram_quantile(0.99, sum by (le) (rate(bscache_upstream_request_duration_seconds_bucket' "$T/queries" \
  || fail "no latency quantile from the histogram"
pass "the dashboard covers hit ratio, calls saved, requests/errors per op, latency quantiles, cache, evictions, reconnects"
