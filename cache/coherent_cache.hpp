// CoherentCache: ExtentCache + TaintTracker, the rules that keep answers safe.
//
// The proxy calls begin_* before sending a command upstream and complete_*
// when its reply arrives. Every state it stores is one upstream could report
// now, or a more conservative one (fewer flag bits), and carries the stamp of
// the command that established it (see ExtentCache): the ticket records when
// the command was sent.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "cache/extent.hpp"
#include "cache/extent_cache.hpp"
#include "cache/taint_tracker.hpp"

namespace bscache::cache {

class CoherentCache {
 public:
  struct Ticket {
    TaintTracker::Ticket id = 0;
    TimePoint sent;  // taken with the ticket, just before the command goes upstream
  };

  explicit CoherentCache(CacheLimits limits = {}, Clock clock = &std::chrono::steady_clock::now);

  Ticket begin_fetch() { return {taint_.begin_fetch(), cache_.now()}; }

  struct FetchOutcome {
    std::vector<Extent> usable;  // the reply, clipped, outside the taint: may answer queries
    size_t stored = 0;           // how many of `usable` (a prefix) were cached
  };
  // Clips `extents` to [0, clip_end) and removes the parts inside the fetch's
  // taint: that is what the reply may answer, stored or not. Stores at most
  // the first `max_stored` of them (what the cache can hold), stamped with the
  // ticket's send time, unless that is already older than the TTL.
  FetchOutcome complete_fetch(Ticket ticket, const std::vector<Extent>& extents, uint64_t clip_end,
                              size_t max_stored = SIZE_MAX);
  void abort_fetch(Ticket ticket) { taint_.finish(ticket.id); }

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
