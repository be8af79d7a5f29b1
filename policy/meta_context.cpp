#include "policy/meta_context.hpp"

#include <algorithm>
#include <bit>

namespace bscache::policy {

ContextKind context_kind(std::string_view name) {
  if (name == "base:allocation") return ContextKind::BaseAllocation;
  if (name == "qemu:allocation-depth") return ContextKind::AllocationDepth;
  // A bitmap has a name: the bare prefix is a LIST_META_CONTEXT query, not a context.
  constexpr std::string_view kBitmap = "qemu:dirty-bitmap:";
  if (name.size() > kBitmap.size() && name.starts_with(kBitmap)) return ContextKind::DirtyBitmap;
  return ContextKind::Unknown;
}

bool cacheable(ContextKind kind) {
  return kind != ContextKind::Unknown;
}

bool remembers_mutations(ContextKind kind) {
  return kind == ContextKind::BaseAllocation;
}

std::optional<uint32_t> state_after(ContextKind kind, Mutation mutation) {
  if (!remembers_mutations(kind)) return std::nullopt;
  return state_after(mutation);
}

void BitmapGranularity::saw_boundary(uint64_t offset) {
  if (offset == 0) return;  // every power of two divides 0: it tells nothing
  bound_ = std::min(bound_, uint64_t{1} << std::countr_zero(offset));
}

}  // namespace bscache::policy
