// One block-status descriptor as bscache stores it: a byte range and its flags.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

namespace bscache::cache {

struct Extent {
  uint64_t offset = 0;
  uint64_t length = 0;
  uint32_t flags = 0;  // base:allocation bits: HOLE = 1, ZERO = 2

  uint64_t end() const { return offset + length; }
  bool operator==(const Extent&) const = default;
};

// Appends to `out` the consecutive extents of `run` (sorted, non-overlapping,
// possibly with gaps) that start exactly at `offset` (the first one clipped to
// start there), joining neighbours with equal flags, stopping at the first
// gap, at `offset + limit`, or after `max_count` extents. Returns how many
// were added; 0 means `offset` is not covered. ExtentCache::lookup's rule,
// for a fetch reply that was not (or could not be) stored.
size_t lookup_run(std::span<const Extent> run, uint64_t offset, uint64_t limit, std::vector<Extent>& out,
                  size_t max_count);

}  // namespace bscache::cache
