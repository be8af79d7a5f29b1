// WriteOrder: which writes to one export may be in flight together.
//
// A read-modify-write (an unaligned WRITE or WRITE_ZEROES, see alignment.hpp)
// reads the blocks at its edges and writes them back whole: any other write
// to those blocks between its read and its write would be undone. So a
// read-modify-write holds its blocks alone, and every other write, trim or
// zero to the export takes its range shared: writes that share a range run
// together as before (NBD does not order them), a read-modify-write waits
// for every overlapping write before it, and every write waits for an
// overlapping read-modify-write before it. Requests are granted in arrival
// order among those that conflict, so a read-modify-write is not starved by
// a stream of writes. Pure bookkeeping: the caller does the waiting.
#pragma once

#include <cstdint>
#include <list>
#include <vector>

namespace bscache::policy {

class WriteOrder {
 public:
  using Id = uint64_t;
  struct Entry {
    Id id;
    uint64_t offset, end;
    bool exclusive;
    bool granted;
  };

  // Queues a claim on [offset, offset + length); `granted` says whether it may go now.
  Entry claim(uint64_t offset, uint64_t length, bool exclusive);
  // Releases a claim (granted or still waiting); returns the ids granted by it, in arrival order.
  std::vector<Id> release(Id id);
  bool empty() const { return entries_.empty(); }

 private:
  bool conflicts_with_earlier(std::list<Entry>::const_iterator it) const;

  std::list<Entry> entries_;  // in arrival order
  Id next_id_ = 1;
};

}  // namespace bscache::policy
