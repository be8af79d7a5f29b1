// Alignment: how a request a client may send unaligned (it did not agree to
// upstream's minimum block size) becomes requests upstream accepts.
#pragma once

#include <cstdint>
#include <optional>

namespace bscache::policy {

struct ByteRange {
  uint64_t offset = 0;
  uint64_t length = 0;
  uint64_t end() const { return offset + length; }
  bool operator==(const ByteRange&) const = default;
};

// Whether [offset, offset + length) starts and ends on `block` boundaries
// (its end may also be `export_size`, the last block being short).
bool is_aligned(ByteRange range, uint32_t block, uint64_t export_size);

// The smallest block-aligned range holding `range`, its end capped at
// `export_size`: what a READ, CACHE or BLOCK_STATUS asks upstream.
ByteRange widen(ByteRange range, uint32_t block, uint64_t export_size);

// The block-aligned part inside `range` (a TRIM's, which may leave its
// margins untouched); nullopt if no whole block lies inside.
std::optional<ByteRange> interior(ByteRange range, uint32_t block, uint64_t export_size);

// What an unaligned WRITE or WRITE_ZEROES does upstream: the blocks at its
// edges are read, patched and written back whole (read-modify-write); the
// whole blocks between are written (or zeroed) as they are.
struct EdgePlan {
  ByteRange whole;                  // widen(): the blocks the command touches
  std::optional<ByteRange> head;    // the first block, if the range starts inside it
  std::optional<ByteRange> tail;    // the last block, if the range ends inside it (never == head)
  std::optional<ByteRange> middle;  // whole blocks between the edges
};
EdgePlan plan_edges(ByteRange range, uint32_t block, uint64_t export_size);

}  // namespace bscache::policy
