#include "policy/prefetch.hpp"

#include <algorithm>

namespace bscache::policy {

unsigned prefetch_depth(const PrefetchConfig& config, std::chrono::nanoseconds upstream_latency) {
  if (!config.enabled) return 0;
  const unsigned max_depth = std::max(config.max_depth, 1u);
  if (config.latency_per_window.count() <= 0) return max_depth;
  const auto extra = static_cast<uint64_t>(std::max<int64_t>(upstream_latency.count(), 0)) /
                     static_cast<uint64_t>(config.latency_per_window.count());
  return static_cast<unsigned>(std::min<uint64_t>(1 + extra, max_depth));
}

bool should_prefetch(uint64_t offset, uint64_t window_start, uint64_t window_end, uint64_t export_size) {
  if (offset < window_start || offset >= window_end || window_end >= export_size) return false;
  return (offset - window_start) >= (window_end - window_start) / 8;
}

void LatencyEstimator::record(std::chrono::nanoseconds sample) {
  if (!seeded_) {
    estimate_ = sample;
    seeded_ = true;
    return;
  }
  // Weight 1/4 on the new sample: follows a change within a few fetches
  // without letting one slow reply double the prefetch depth.
  estimate_ = (estimate_ * 3 + sample) / 4;
}

}  // namespace bscache::policy
