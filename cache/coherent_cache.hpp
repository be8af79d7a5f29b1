// CoherentCache: ExtentCache + TaintTracker, the rules that keep answers safe.
//
// The proxy calls begin_* before sending a command upstream and complete_*
// when its reply arrives. Every state it stores is one upstream could report
// now, or a more conservative one (fewer flag bits).
#pragma once

#include <cstdint>
#include <optional>
#include <span>

#include "cache/extent.hpp"
#include "cache/extent_cache.hpp"
#include "cache/taint_tracker.hpp"

namespace bscache::cache {

class CoherentCache {
 public:
  using Ticket = TaintTracker::Ticket;

  explicit CoherentCache(CacheLimits limits = {}, Clock clock = &std::chrono::steady_clock::now);

  Ticket begin_fetch() { return taint_.begin_fetch(); }
  // Stores the parts of `extents` outside the fetch's taint, clipped to [0, clip_end).
  void complete_fetch(Ticket ticket, std::span<const Extent> extents, uint64_t clip_end);
  void abort_fetch(Ticket ticket) { taint_.finish(ticket); }

  // Forgets the range, rounded out to the allocation granularity, at once:
  // while the mutation is in flight nothing is known about it.
  Ticket begin_mutation(uint64_t offset, uint64_t length);
  // `state_after` is what a successful mutation leaves (policy decides); nullopt
  // (or a failed command) leaves the range unknown. The range becomes 0; a
  // state with bits set (ZERO) is claimed only over the whole allocation units
  // inside it and outside the taint. The margins added by rounding out stay
  // unknown: upstream may now report them allocated.
  void complete_mutation(Ticket ticket, uint64_t offset, uint64_t length, std::optional<uint32_t> state_after);

  void clear() { cache_.clear(); }
  ExtentCache& extents() { return cache_; }
  const ExtentCache& extents() const { return cache_; }

 private:
  struct Range {
    uint64_t offset, length;
  };
  Range widen(uint64_t offset, uint64_t length) const;

  uint64_t granularity_;
  ExtentCache cache_;
  TaintTracker taint_;
};

}  // namespace bscache::cache
