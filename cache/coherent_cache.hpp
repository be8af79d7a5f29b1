// CoherentCache: one ExtentCache per cached meta context of an export, and
// one TaintTracker for all of them: the rules that keep answers safe.
//
// The proxy calls begin_* before sending a command upstream and complete_*
// when its reply arrives. Every state it stores is one upstream could report
// now, or a more conservative one, and carries the stamp of the command that
// established it (see ExtentCache): the ticket records when the command was
// sent. A race between a fetch and a mutation is a matter of time, not of
// context, so the taint is tracked once; one fetch reply may fill every
// context (upstream answers them all in one call), each outside the taint
// rounded out to that context's granularity.
//
// Contexts differ in two rules (policy/meta_context.hpp decides which):
//  - granularity: how far around a mutation upstream may report a change
//    (allocation units; a dirty bitmap's granules);
//  - whether a completed mutation leaves a known state (base:allocation:
//    data, or ZERO) or only forgets its range (allocation depth, dirty
//    bitmaps: no state is safe to assume).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
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

  // Starts with one context (index 0) of `limits.allocation_granularity`
  // that remembers what mutations leave. Every context shares
  // `limits.budget` (one of their own when it is null).
  explicit CoherentCache(CacheLimits limits = {}, Clock clock = &std::chrono::steady_clock::now);

  // Adds a context; returns its index.
  size_t add_context(uint64_t granularity, bool remembers_mutations);
  size_t contexts() const { return contexts_.size(); }
  // A granularity may change while operations are pending (a dirty bitmap's,
  // as its replies tell more of it): what was forgotten or tainted with the
  // old one stays so, which only widens it.
  void set_granularity(size_t context, uint64_t granularity);
  uint64_t granularity(size_t context) const { return contexts_.at(context).granularity; }

  TimePoint now() const { return clock_(); }

  Ticket begin_fetch() { return {taint_.begin_fetch(), now()}; }

  struct FetchOutcome {
    std::vector<Extent> usable;  // the reply, clipped, outside the taint: may answer queries
    size_t stored = 0;           // how many of `usable` (a prefix) were cached
  };
  // One context's part of a fetch reply.
  struct ContextReply {
    size_t context = 0;
    std::span<const Extent> extents;
    size_t max_stored = SIZE_MAX;
  };
  // Ends the fetch. For each reply: clips `extents` to [0, clip_end) and
  // removes the parts inside the fetch's taint: that is what the reply may
  // answer, stored or not. Stores at most `max_stored` of them (what the cache
  // can hold), stamped with the ticket's send time, unless that is already
  // older than the TTL. One outcome per reply, in order.
  std::vector<FetchOutcome> complete_fetch(Ticket ticket, std::span<const ContextReply> replies, uint64_t clip_end);
  // The same for context 0 alone.
  FetchOutcome complete_fetch(Ticket ticket, const std::vector<Extent>& extents, uint64_t clip_end,
                              size_t max_stored = SIZE_MAX);
  void abort_fetch(Ticket ticket) { taint_.finish(ticket.id); }

  // Forgets the range in every context, rounded out to its granularity, at
  // once: while the mutation is in flight nothing is known about it.
  Ticket begin_mutation(uint64_t offset, uint64_t length);
  // `state_after` is what a successful mutation leaves (policy decides);
  // nullopt (or a failed command) leaves the range unknown, and so does every
  // context that does not remember mutations. Elsewhere the range becomes 0;
  // a state with bits set (ZERO) is claimed only over the whole allocation
  // units inside it and outside the taint. The margins added by rounding out
  // stay unknown: upstream may now report them allocated.
  void complete_mutation(Ticket ticket, uint64_t offset, uint64_t length, std::optional<uint32_t> state_after);

  void clear();
  ExtentCache& extents(size_t context = 0) { return *contexts_.at(context).cache; }
  const ExtentCache& extents(size_t context = 0) const { return *contexts_.at(context).cache; }

 private:
  struct Context {
    std::unique_ptr<ExtentCache> cache;  // not movable: the budget knows its address
    uint64_t granularity = 1;
    bool remembers_mutations = true;
  };
  struct Range {
    uint64_t offset, length;
  };
  static Range widen(uint64_t offset, uint64_t length, uint64_t granularity);
  static RangeSet widen(const RangeSet& taint, uint64_t granularity);
  FetchOutcome store_fetched(const RangeSet& taint, Ticket ticket, const ContextReply& reply, uint64_t clip_end);

  CacheLimits limits_;  // with the budget every context shares
  Clock clock_;
  std::vector<Context> contexts_;
  TaintTracker taint_;  // the mutations' own ranges; each context rounds them out
};

}  // namespace bscache::cache
