// TaintTracker: which ranges were mutated while an operation was in flight.
//
// A block-status fetch sent upstream before a write completes may describe the
// range as it was before the write. Every pending operation (fetch or mutation)
// gets a ticket; its taint is the union of every mutation that was in flight
// when it began or that began while it was pending. A fetch reply may be stored
// only outside its taint. A WRITE_ZEROES may mark ZERO only outside its taint,
// since a concurrent overlapping write may have been applied after it.
#pragma once

#include <cstdint>
#include <map>

#include <boost/icl/interval_set.hpp>

namespace bscache::cache {

using RangeSet = boost::icl::interval_set<uint64_t, std::less, boost::icl::right_open_interval<uint64_t>>;

class TaintTracker {
 public:
  using Ticket = uint64_t;

  Ticket begin_fetch();
  Ticket begin_mutation(uint64_t offset, uint64_t length);
  // Ends the ticket and returns its taint.
  RangeSet finish(Ticket ticket);

  size_t pending() const { return pending_.size(); }

 private:
  struct Pending {
    bool is_mutation = false;
    uint64_t offset = 0;
    uint64_t length = 0;
    RangeSet taint;
  };
  Ticket begin(Pending p);

  Ticket next_ = 1;
  std::map<Ticket, Pending> pending_;
};

}  // namespace bscache::cache
