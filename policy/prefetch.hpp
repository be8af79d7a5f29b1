// Prefetch decisions: when a scan nears the end of a cached run, and how many
// windows ahead to keep in flight given how slow upstream is.
#pragma once

#include <chrono>
#include <cstdint>

namespace bscache::policy {

struct PrefetchConfig {
  // Fetch ahead of sequential scans. Default: true.
  bool enabled = true;
  // Most windows fetched ahead of a scan at once. Default: 12.
  unsigned max_depth = 12;
  // Upstream latency that earns one more window of depth. Default: 5 ms.
  std::chrono::nanoseconds latency_per_window = std::chrono::milliseconds(5);
};

// Windows to keep in flight ahead of a scan: 1 for a fast upstream, one more
// per `latency_per_window` of measured latency, at most `max_depth`, 0 if disabled.
unsigned prefetch_depth(const PrefetchConfig& config, std::chrono::nanoseconds upstream_latency);

// A client at `offset` inside a fetched window [window_start, window_end)
// triggers a prefetch once it has moved an eighth of the way in (a scan, not
// one random look-up at the window's first byte) and the window does not
// already reach the export end. Early, because qemu crosses a sparse 4 GiB
// window in a few milliseconds: waiting for the half would leave it waiting
// on upstream at every window edge.
bool should_prefetch(uint64_t offset, uint64_t window_start, uint64_t window_end, uint64_t export_size);

// Exponentially weighted moving average of upstream block-status latency.
class LatencyEstimator {
 public:
  void record(std::chrono::nanoseconds sample);
  // 0 until the first sample.
  std::chrono::nanoseconds estimate() const { return estimate_; }

 private:
  std::chrono::nanoseconds estimate_{0};
  bool seeded_ = false;
};

}  // namespace bscache::policy
