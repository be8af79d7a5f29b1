#include "policy/fetch_window.hpp"

#include <algorithm>

namespace bscache::policy {

FetchWindow plan_fetch(uint64_t offset, uint64_t export_size, uint32_t min_block, uint64_t max_window,
                       uint64_t end_align, uint64_t request_limit) {
  const uint64_t block = min_block ? min_block : 1;
  if (offset >= export_size) return {offset, 0};
  const uint64_t start = offset / block * block;
  uint64_t cap = std::min(max_window, request_limit) / block * block;
  if (cap == 0) cap = block;
  uint64_t end = start + std::min(cap, export_size - start);
  if (end < export_size && end_align > 1 && end_align % block == 0) {
    const uint64_t aligned = end / end_align * end_align;
    if (aligned > offset) end = aligned;
  }
  return {start, end - start};
}

FetchWindow window_for_miss(uint64_t offset, uint64_t length, bool req_one, FetchWindow planned,
                            uint64_t request_limit) {
  if (req_one || length > request_limit || offset + length <= planned.offset + planned.length) return planned;
  return {offset, length};
}

}  // namespace bscache::policy
