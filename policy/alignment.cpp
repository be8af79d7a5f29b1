#include "policy/alignment.hpp"

#include <algorithm>

namespace bscache::policy {

namespace {
uint64_t down(uint64_t x, uint64_t block) {
  return x / block * block;
}
uint64_t up(uint64_t x, uint64_t block, uint64_t cap) {
  return std::min(cap, (x + block - 1) / block * block);
}
bool on_boundary(uint64_t x, uint64_t block, uint64_t export_size) {
  return x % block == 0 || x == export_size;
}
}  // namespace

bool is_aligned(ByteRange range, uint32_t block, uint64_t export_size) {
  if (block <= 1) return true;
  return on_boundary(range.offset, block, export_size) && on_boundary(range.end(), block, export_size);
}

ByteRange widen(ByteRange range, uint32_t block, uint64_t export_size) {
  if (block <= 1) return range;
  const uint64_t start = down(range.offset, block);
  const uint64_t end = std::max(up(range.end(), block, export_size), range.end());
  return {start, end - start};
}

std::optional<ByteRange> interior(ByteRange range, uint32_t block, uint64_t export_size) {
  if (block <= 1) return range.length ? std::optional(range) : std::nullopt;
  const uint64_t start = up(range.offset, block, export_size);
  const uint64_t end = range.end() == export_size ? export_size : down(range.end(), block);
  if (end <= start) return std::nullopt;
  return ByteRange{start, end - start};
}

EdgePlan plan_edges(ByteRange range, uint32_t block, uint64_t export_size) {
  EdgePlan plan;
  plan.whole = widen(range, block, export_size);
  if (block <= 1) {
    plan.middle = range;
    return plan;
  }
  auto block_at = [&](uint64_t start) { return ByteRange{start, std::min<uint64_t>(block, plan.whole.end() - start)}; };
  if (!on_boundary(range.offset, block, export_size)) plan.head = block_at(plan.whole.offset);
  if (!on_boundary(range.end(), block, export_size)) {
    const ByteRange last = block_at(down(range.end(), block));
    if (!plan.head || last.offset != plan.head->offset) plan.tail = last;
  }
  const uint64_t middle_start = plan.head ? plan.head->end() : plan.whole.offset;
  const uint64_t middle_end = plan.tail ? plan.tail->offset : plan.whole.end();
  if (middle_end > middle_start) plan.middle = ByteRange{middle_start, middle_end - middle_start};
  return plan;
}

}  // namespace bscache::policy
