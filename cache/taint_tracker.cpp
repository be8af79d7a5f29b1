#include "cache/taint_tracker.hpp"

namespace bscache::cache {

namespace {
using Interval = boost::icl::right_open_interval<uint64_t>;
}

TaintTracker::Ticket TaintTracker::begin(Pending p) {
  const Ticket ticket = next_++;
  pending_.emplace(ticket, std::move(p));
  return ticket;
}

TaintTracker::Ticket TaintTracker::begin_fetch() {
  Pending p;
  for (const auto& [ticket, other] : pending_) {
    if (other.is_mutation) p.taint += Interval(other.offset, other.offset + other.length);
  }
  return begin(std::move(p));
}

TaintTracker::Ticket TaintTracker::begin_mutation(uint64_t offset, uint64_t length) {
  Pending p{true, offset, length, {}};
  if (length > 0) {
    const Interval range(offset, offset + length);
    for (auto& [ticket, other] : pending_) {
      other.taint += range;
      if (other.is_mutation && other.length > 0) p.taint += Interval(other.offset, other.offset + other.length);
    }
  }
  return begin(std::move(p));
}

RangeSet TaintTracker::finish(Ticket ticket) {
  auto it = pending_.find(ticket);
  if (it == pending_.end()) return {};
  RangeSet taint = std::move(it->second.taint);
  pending_.erase(it);
  return taint;
}

}  // namespace bscache::cache
