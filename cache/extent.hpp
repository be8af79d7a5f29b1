// One block-status descriptor as bscache stores it: a byte range and its flags.
#pragma once
#include <cstdint>

namespace bscache::cache {

struct Extent {
  uint64_t offset = 0;
  uint64_t length = 0;
  uint32_t flags = 0;  // base:allocation bits: HOLE = 1, ZERO = 2

  uint64_t end() const { return offset + length; }
  bool operator==(const Extent&) const = default;
};

}  // namespace bscache::cache
