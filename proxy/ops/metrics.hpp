// Metrics: plain counters owned by the loop thread (no locks on the hot path),
// rendered as the stats-file JSON and as Prometheus text.
//
// Invariants: block_status_hits + block_status_misses equals the client
// BLOCK_STATUS requests that passed validation (answered successfully or not).
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "proxy/wire/protocol.hpp"

namespace bscache::proxy {

inline constexpr size_t kOpCount = 8;  // indexed by NBD command number (READ..BLOCK_STATUS)

// Upstream block-status latency buckets, in seconds (Prometheus `le` bounds).
inline constexpr std::array<double, 12> kLatencyBuckets = {0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                                                           0.025,  0.05,   0.1,   0.25,   0.5,   1.0};

struct Histogram {
  std::array<uint64_t, kLatencyBuckets.size()> buckets{};  // non-cumulative
  uint64_t count = 0;
  double sum = 0;
  void observe(double seconds);
};

// Block status of one meta context (a request about several counts for each).
// hits + misses = the validated requests that asked about it.
struct ContextCounters {
  uint64_t hits = 0;
  uint64_t misses = 0;
  // Upstream block-status calls made for it: a window fetch or prefetch for
  // every context it fills, a query asked upstream as it came for each
  // context it names (one call made for several contexts counts for each).
  uint64_t upstream_calls = 0;
  double hit_rate() const;
};

struct Metrics {
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
  uint64_t connections_current = 0;
  uint64_t connections_total = 0;
  uint64_t connections_rejected = 0;
  std::array<uint64_t, kOpCount> client_requests{};
  std::array<uint64_t, kOpCount> client_errors{};
  uint64_t block_status_hits = 0;
  uint64_t block_status_misses = 0;
  std::array<uint64_t, kOpCount> upstream_requests{};
  std::array<uint64_t, kOpCount> upstream_errors{};
  Histogram upstream_block_status_latency;
  uint64_t prefetches_issued = 0;
  uint64_t prefetches_used = 0;  // prefetched windows that later answered a client
  uint64_t ranges_invalidated = 0;
  uint64_t ranges_updated = 0;
  uint64_t upstream_reconnects = 0;
  uint64_t upstream_connections = 0;       // upstream connections up now
  uint64_t upstream_extended_headers = 0;  // of those, the ones whose requests and replies use extended headers
  uint64_t reads_spliced = 0;              // READs whose data went through pipes (PipePool), not bscache's memory
  uint64_t writes_spliced = 0;             // the same for WRITEs
  uint64_t cache_bypassed = 0;             // block-status misses forwarded unchanged: the cache could not keep a window
  std::map<std::string, ContextCounters>
      contexts;  // by meta context name; map nodes stay put (the service keeps pointers)
  // What all clients hold in bscache and its bound (see ClientMemory); set by
  // the app when rendering, not counted per export.
  uint64_t client_memory_bytes = 0;
  uint64_t client_memory_limit = 0;
  uint64_t client_memory_pauses = 0;  // clients stopped by the bound, ever
  uint64_t client_memory_paused = 0;  // ...and waiting now
  uint64_t memory_trims = 0;          // times freed memory was given back to the system (malloc_trim)
};

// Values that live elsewhere (the cache) and are sampled when rendering.
struct CacheGauges {
  uint64_t extents = 0;
  uint64_t memory_bytes = 0;
  uint64_t evictions = 0;
  uint64_t expirations = 0;
  uint64_t max_extents = 0;  // the limit in force
};

// One export's counters (see ExportRegistry), for the stats file and Prometheus.
struct ExportStats {
  std::string name;
  const Metrics* metrics = nullptr;
  CacheGauges cache;
  bool open = false;
};

// Adds what `part` counts for one export (everything but the client
// connection counters) to `total`.
void add_export_counters(Metrics& total, const Metrics& part);

double hit_rate(const Metrics& m);
// Client block-status requests minus those sent upstream: negative when the
// cache cost more upstream calls than forwarding every request would have.
inline int64_t upstream_calls_saved(const Metrics& m) {
  return static_cast<int64_t>(m.client_requests[wire::kCmdBlockStatus]) -
         static_cast<int64_t>(m.upstream_requests[wire::kCmdBlockStatus]);
}
// The stats-file document (keys documented in README.md): totals, and each
// export's own counters under "exports".
std::string render_stats_json(const Metrics& m, const CacheGauges& cache, const std::string& policy,
                              const std::vector<ExportStats>& exports = {});
// Prometheus text exposition format 0.0.4: every per-export series once
// without an `export` label (the total) and once per export with it.
std::string render_prometheus(const Metrics& m, const CacheGauges& cache, const std::string& policy,
                              const std::vector<ExportStats>& exports = {});
// Writes `contents` to `path` atomically (temp file in the same directory, then rename).
bool write_file_atomically(const std::string& path, const std::string& contents, std::string& error);

}  // namespace bscache::proxy
