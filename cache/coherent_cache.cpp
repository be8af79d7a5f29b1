#include "cache/coherent_cache.hpp"

#include <algorithm>

namespace bscache::cache {

namespace {
using Interval = boost::icl::right_open_interval<uint64_t>;
}

CoherentCache::CoherentCache(CacheLimits limits, Clock clock)
    : granularity_(std::max<uint64_t>(limits.allocation_granularity, 1)), cache_(std::move(limits), std::move(clock)) {}

CoherentCache::Range CoherentCache::widen(uint64_t offset, uint64_t length) const {
  const uint64_t start = offset / granularity_ * granularity_;
  const uint64_t end = offset + length;
  const uint64_t rounded_end = end % granularity_ ? end - end % granularity_ + granularity_ : end;
  return {start, std::max(rounded_end, end) - start};  // max(): rounding past UINT64_MAX
}

CoherentCache::FetchOutcome CoherentCache::complete_fetch(Ticket ticket, const std::vector<Extent>& extents,
                                                          uint64_t clip_end, size_t max_stored) {
  const RangeSet taint = taint_.finish(ticket.id);
  FetchOutcome outcome;
  auto& usable = outcome.usable;
  usable.reserve(extents.size());
  for (const auto& e : extents) {
    const uint64_t end = std::min(e.end(), clip_end);
    if (e.offset >= end) continue;
    if (taint.empty()) {
      usable.push_back({e.offset, end - e.offset, e.flags});
      continue;
    }
    // Only what no mutation could have changed under the fetch is usable.
    RangeSet clean;
    clean += Interval(e.offset, end);
    clean -= taint;
    for (const auto& piece : clean) usable.push_back({piece.lower(), piece.upper() - piece.lower(), e.flags});
  }
  const size_t count = std::min(max_stored, usable.size());
  if (cache_.store(std::span(usable).first(count), ticket.sent)) outcome.stored = count;  // else older than the TTL
  return outcome;
}

CoherentCache::Ticket CoherentCache::begin_mutation(uint64_t offset, uint64_t length) {
  const Range affected = widen(offset, length);
  cache_.erase(affected.offset, affected.length);
  return {taint_.begin_mutation(affected.offset, affected.length), cache_.now()};
}

void CoherentCache::complete_mutation(Ticket ticket, uint64_t offset, uint64_t length,
                                      std::optional<uint32_t> state_after) {
  const RangeSet taint = taint_.finish(ticket.id);
  if (length == 0) return;
  // No fetch stored into the widened range while this was pending (tainted),
  // but a concurrent mutation may have completed there: what upstream reports
  // in the margins now is unknown, so forget them again.
  const Range affected = widen(offset, length);
  cache_.erase(affected.offset, affected.length);
  if (!state_after) return;
  // Stamps. "Data" (0) is a safe answer at any age: its stamp cannot make an
  // answer wrong, only keep an imprecise one around. We stamp it with the
  // completion time rather than "never expires" so that, under a TTL, every
  // cached state is at most TTL old and a range trimmed behind our back is
  // reported as a hole again within the TTL. A ZERO claim is different: an
  // outside write that completes while this WRITE_ZEROES is in flight may land
  // after it, so the claim is only known to reflect writes completed before
  // this command was sent: it gets the send time, like a fetch.
  cache_.store(offset, length, 0, cache_.now());
  if (*state_after == 0) return;
  // ZERO is claimed only for whole allocation units (upstream may report a
  // partly zeroed unit as allocated data) and only where no overlapping
  // mutation ran concurrently (it may have landed after this one).
  const uint64_t first = (offset + granularity_ - 1) / granularity_ * granularity_;
  const uint64_t last = (offset + length) / granularity_ * granularity_;
  if (first >= last) return;
  RangeSet claim;
  claim += Interval(first, last);
  claim -= taint;
  for (const auto& piece : claim) cache_.store(piece.lower(), piece.upper() - piece.lower(), *state_after, ticket.sent);
}

}  // namespace bscache::cache
