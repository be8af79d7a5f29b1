#include "cache/extent.hpp"

#include <algorithm>
#include <limits>

namespace bscache::cache {

size_t lookup_run(std::span<const Extent> run, uint64_t offset, uint64_t limit, std::vector<Extent>& out,
                  size_t max_count) {
  if (limit == 0 || max_count == 0) return 0;
  // The first extent ending after `offset`.
  auto it =
      std::upper_bound(run.begin(), run.end(), offset, [](uint64_t pos, const Extent& e) { return pos < e.end(); });
  const uint64_t end =
      limit > std::numeric_limits<uint64_t>::max() - offset ? std::numeric_limits<uint64_t>::max() : offset + limit;
  uint64_t pos = offset;
  size_t added = 0;
  for (; it != run.end() && pos < end; ++it) {
    if (it->length == 0) continue;
    if (it->offset > pos) break;  // a gap: the run ends here
    const uint64_t piece_end = std::min(it->end(), end);
    if (added > 0 && out.back().flags == it->flags && out.back().end() == pos) {
      out.back().length += piece_end - pos;
    } else {
      if (added == max_count) break;
      out.push_back({pos, piece_end - pos, it->flags});
      ++added;
    }
    pos = piece_end;
  }
  return added;
}

}  // namespace bscache::cache
