// MetaContext: what bscache knows of a block-status meta context's meaning,
// and so whether (and how) it may cache it.
//
// "Conservative" differs by context. For base:allocation fewer flag bits is
// always safe (data, not a hole), so a mutation that passed through may leave
// a state behind. qemu:allocation-depth (a layer number) and
// qemu:dirty-bitmap:NAME (bit 0: dirty) have no such value: a depth or a
// "clean" that was true before a write may be false after it, and no other
// value is safe instead. For those a mutation only forgets, and the next
// query asks upstream again. A context bscache does not know is never
// cached: it cannot tell what a write does to it.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

#include "policy/coherence.hpp"

namespace bscache::policy {

enum class ContextKind {
  BaseAllocation,   // "base:allocation": HOLE = 1, ZERO = 2
  AllocationDepth,  // "qemu:allocation-depth": 0 unallocated, 1 this layer, n the (n-1)th backing file
  DirtyBitmap,      // "qemu:dirty-bitmap:NAME": DIRTY = 1
  Unknown,          // anything else: passed through, never cached
};

ContextKind context_kind(std::string_view name);

// Whether bscache may keep the context's answers (when caching at all).
bool cacheable(ContextKind kind);

// Whether a successful mutation may leave a known state in the context
// (state_after()), rather than leaving its range unknown.
bool remembers_mutations(ContextKind kind);

// The context's state over a range after a successful mutation of it;
// nullopt: unknown (forget it). base:allocation as state_after(mutation);
// every other context nullopt.
std::optional<uint32_t> state_after(ContextKind kind, Mutation mutation);

// A dirty bitmap's granularity, as far as its replies tell: a write through
// bscache dirties whole granules, so it is forgotten rounded out to one. The
// granularity is a power of two that divides every offset where a bitmap's
// state changes (a boundary between two of upstream's descriptors, never the
// end of a reply, which is where the request ended), so the largest power of
// two dividing all of them bounds it from above; until one is seen, qemu's
// largest granularity, 2 GiB, is assumed.
class BitmapGranularity {
 public:
  static constexpr uint64_t kLargest = uint64_t{1} << 31;
  // `offset`: where one descriptor of a reply ended and the next began.
  void saw_boundary(uint64_t offset);
  uint64_t bound() const { return bound_; }
  void reset() { bound_ = kLargest; }

 private:
  uint64_t bound_ = kLargest;
};

}  // namespace bscache::policy
