// Capacity: what the cache can afford to fetch and keep, so that it never
// costs more upstream calls than forwarding every request would.
//
// Three rules keep it so (BlockStatusService applies them):
//  - a miss costs at most one upstream call: the fetch's reply answers the
//    query that caused it and every query waiting on it, even when none of
//    the reply can be kept;
//  - a window is sized to what the cache can hold beside the window being
//    read and the windows fetched ahead; what does not fit is not stored;
//  - a prefetch is speculation: it is paid for with calls already saved.
// When the cache cannot hold even one useful window, requests are forwarded
// as they came.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace bscache::policy {

// A window of one extent answers only the query that caused it: no better
// than forwarding that query.
inline constexpr size_t kMinWindowExtents = 2;

// Extents one window may bring into a cache of `capacity` extents while
// `depth` more windows are fetched ahead: the cache is shared by the window
// being read, this one and those ahead, capacity / (2 + depth). (Other
// clients' windows compete for the same room; least recently used go first.)
size_t window_extent_budget(size_t capacity, unsigned depth);

// The prefetch depth a cache of `capacity` can hold: at most `wanted`, and
// shallow enough that every window keeps kMinWindowExtents.
unsigned affordable_depth(size_t capacity, unsigned wanted);

// Prefetches that may be sent now: at most `depth`, and no more than the
// upstream calls caching has saved so far (client block-status requests minus
// those sent upstream), so that prefetches that are never used cannot make
// the cache cost more calls than no cache.
unsigned prefetch_allowance(unsigned depth, int64_t calls_saved);

// True when the cache cannot keep one window of kMinWindowExtents beside the
// one being read: each request is then forwarded as it came.
bool should_bypass(size_t capacity);

// Bytes a window should span to hold about `extents` extents at the observed
// density; `max_window` when the density is not known yet.
uint64_t window_bytes(size_t extents, std::optional<double> bytes_per_extent, uint64_t max_window);

// Moving average of the bytes one extent spans in upstream's replies.
class DensityEstimator {
 public:
  // A reply of `extents` descriptors covering `bytes` of the window.
  void record(size_t extents, uint64_t bytes);
  // nullopt until the first reply.
  std::optional<double> bytes_per_extent() const { return estimate_; }

 private:
  std::optional<double> estimate_;
};

// Parses "268435456", "64K", "256M", "1G", "1T" (binary multiples, optional
// trailing "B" or "iB"); nullopt if malformed, zero or over 2^64.
std::optional<uint64_t> parse_byte_size(std::string_view text);

}  // namespace bscache::policy
