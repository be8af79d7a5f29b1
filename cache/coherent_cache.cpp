#include "cache/coherent_cache.hpp"

#include <algorithm>

namespace bscache::cache {

namespace {
using Interval = boost::icl::right_open_interval<uint64_t>;

CacheLimits with_budget(CacheLimits limits) {
  if (!limits.budget) limits.budget = std::make_shared<CacheBudget>(limits.max_extents);
  return limits;
}
}  // namespace

CoherentCache::CoherentCache(CacheLimits limits, Clock clock)
    : limits_(with_budget(std::move(limits))), clock_(std::move(clock)) {
  add_context(limits_.allocation_granularity, true);
}

size_t CoherentCache::add_context(uint64_t granularity, bool remembers_mutations) {
  contexts_.push_back(
      {std::make_unique<ExtentCache>(limits_, clock_, this), std::max<uint64_t>(granularity, 1), remembers_mutations});
  return contexts_.size() - 1;
}

void CoherentCache::set_granularity(size_t context, uint64_t granularity) {
  contexts_.at(context).granularity = std::max<uint64_t>(granularity, 1);
}

void CoherentCache::clear() {
  for (auto& c : contexts_) c.cache->clear();
}

CoherentCache::Range CoherentCache::widen(uint64_t offset, uint64_t length, uint64_t granularity) {
  const uint64_t start = offset / granularity * granularity;
  const uint64_t end = offset + length;
  const uint64_t rounded_end = end % granularity ? end - end % granularity + granularity : end;
  return {start, std::max(rounded_end, end) - start};  // max(): rounding past UINT64_MAX
}

RangeSet CoherentCache::widen(const RangeSet& taint, uint64_t granularity) {
  if (granularity == 1) return taint;
  RangeSet wide;
  for (const auto& piece : taint) {
    const Range r = widen(piece.lower(), piece.upper() - piece.lower(), granularity);
    wide += Interval(r.offset, r.offset + r.length);
  }
  return wide;
}

CoherentCache::FetchOutcome CoherentCache::store_fetched(const RangeSet& raw_taint, Ticket ticket,
                                                         const ContextReply& reply, uint64_t clip_end) {
  Context& context = contexts_.at(reply.context);
  const RangeSet taint = widen(raw_taint, context.granularity);
  FetchOutcome outcome;
  auto& usable = outcome.usable;
  usable.reserve(reply.extents.size());
  for (const auto& e : reply.extents) {
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
  const size_t count = std::min(reply.max_stored, usable.size());
  if (context.cache->store(std::span(usable).first(count), ticket.sent)) outcome.stored = count;  // else too old
  return outcome;
}

std::vector<CoherentCache::FetchOutcome> CoherentCache::complete_fetch(Ticket ticket,
                                                                       std::span<const ContextReply> replies,
                                                                       uint64_t clip_end) {
  const RangeSet taint = taint_.finish(ticket.id);
  std::vector<FetchOutcome> outcomes;
  outcomes.reserve(replies.size());
  for (const auto& reply : replies) outcomes.push_back(store_fetched(taint, ticket, reply, clip_end));
  return outcomes;
}

CoherentCache::FetchOutcome CoherentCache::complete_fetch(Ticket ticket, const std::vector<Extent>& extents,
                                                          uint64_t clip_end, size_t max_stored) {
  const ContextReply reply{.context = 0, .extents = extents, .max_stored = max_stored};
  return std::move(complete_fetch(ticket, std::span(&reply, 1), clip_end).front());
}

CoherentCache::Ticket CoherentCache::begin_mutation(uint64_t offset, uint64_t length) {
  for (auto& c : contexts_) {
    const Range affected = widen(offset, length, c.granularity);
    c.cache->erase(affected.offset, affected.length);
  }
  return {taint_.begin_mutation(offset, length), now()};
}

void CoherentCache::complete_mutation(Ticket ticket, uint64_t offset, uint64_t length,
                                      std::optional<uint32_t> state_after) {
  const RangeSet raw_taint = taint_.finish(ticket.id);
  if (length == 0) return;
  for (auto& c : contexts_) {
    // No fetch stored into the widened range while this was pending (tainted),
    // but a concurrent mutation may have completed there: what upstream reports
    // in the margins now is unknown, so forget them again.
    const Range affected = widen(offset, length, c.granularity);
    c.cache->erase(affected.offset, affected.length);
    if (!state_after || !c.remembers_mutations) continue;
    // Stamps. "Data" (0) is a safe answer at any age: its stamp cannot make an
    // answer wrong, only keep an imprecise one around. We stamp it with the
    // completion time rather than "never expires" so that, under a TTL, every
    // cached state is at most TTL old and a range trimmed behind our back is
    // reported as a hole again within the TTL. A ZERO claim is different: an
    // outside write that completes while this WRITE_ZEROES is in flight may land
    // after it, so the claim is only known to reflect writes completed before
    // this command was sent: it gets the send time, like a fetch.
    c.cache->store(offset, length, 0, now());
    if (*state_after == 0) continue;
    // ZERO is claimed only for whole allocation units (upstream may report a
    // partly zeroed unit as allocated data) and only where no overlapping
    // mutation ran concurrently (it may have landed after this one).
    const uint64_t g = c.granularity;
    const uint64_t first = (offset + g - 1) / g * g;
    const uint64_t last = (offset + length) / g * g;
    if (first >= last) continue;
    RangeSet claim;
    claim += Interval(first, last);
    claim -= widen(raw_taint, g);
    for (const auto& piece : claim)
      c.cache->store(piece.lower(), piece.upper() - piece.lower(), *state_after, ticket.sent);
  }
}

}  // namespace bscache::cache
