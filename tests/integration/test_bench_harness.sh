#!/usr/bin/env bash
# The benchmark harness must not rot: run it once on tiny images and check
# that it produced every table, the ratios and the chart.
source "$(dirname "$0")/lib.sh"
repo=$(cd "$(dirname "$0")/../.." && pwd)

BENCH_TINY=1 BSCACHE=$BSCACHE "$repo/bench/run.sh" --out "$T/bench" >"$T/bench.log" 2>&1 || fail "bench/run.sh failed"
results=$T/bench/RESULTS.md
for section in "seq-map — seconds" "convert — seconds" "big-sparse — seconds" "two-scanners — seconds" \
  "write-mix — hit_rate" "incremental-backup — seconds" "incremental-backup — hit_rate" "tmpfs — seconds" "hit-latency-qd16 — microseconds" "data-read — seconds" \
  "data-write — seconds" "memory — rss_bytes_per_extent" "capacity-pressure — seconds" "dense-map-cold — seconds" "multi-export — seconds" "multi-export — peak_rss_mib" "tls-data-read — seconds" \
  "tls-hit-latency-qd1 — microseconds" "convert-variance — seconds" "tcp-read — seconds" "tcp-write — peak_rss_mib" \
  "tls-data-read-convert — seconds" "tls-data-write — seconds"; do
  grep -qF "## $section" "$results" || fail "RESULTS.md lacks '$section'"
done
grep -q "bscache/cacheextents = " "$results" || fail "no ratios against cacheextents"
grep -q "bscache-tls/bscache = " "$results" || fail "no ratios of bscache over TLS against plain"
grep -q "bscache-tls/nbdkit-nbd-tls = " "$results" || fail "no ratios of bscache over TLS against nbdkit's nbd plugin"
[[ -s $T/bench/ratios.png ]] || fail "no chart"
pass "bench harness produces every table and the chart"
