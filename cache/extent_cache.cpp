#include "cache/extent_cache.hpp"

#include <algorithm>
#include <limits>

namespace bscache::cache {

namespace {
using Interval = boost::icl::right_open_interval<uint64_t>;

uint64_t saturating_add(uint64_t a, uint64_t b) {
  return b > std::numeric_limits<uint64_t>::max() - a ? std::numeric_limits<uint64_t>::max() : a + b;
}
}  // namespace

ExtentCache::ExtentCache(CacheLimits limits, Clock clock, const void* group)
    : limits_(std::move(limits)),
      budget_(limits_.budget ? limits_.budget : std::make_shared<CacheBudget>(limits_.max_extents)),
      group_(group ? group : this),
      clock_(std::move(clock)) {
  budget_->members_.push_back(this);
}

ExtentCache::~ExtentCache() {
  std::erase(budget_->members_, this);
}

size_t ExtentCache::planning_share() const {
  std::vector<const void*> others;  // groups other than ours holding anything
  for (const ExtentCache* c : budget_->members_) {
    if (c->group_ != group_ && c->charge() > 0 && std::find(others.begin(), others.end(), c->group_) == others.end()) {
      others.push_back(c->group_);
    }
  }
  return std::max<size_t>(budget_->max_extents() / (1 + others.size()), 1);
}

size_t CacheBudget::used() const {
  size_t sum = 0;
  for (const ExtentCache* c : members_) sum += c->charge();
  return sum;
}

bool ExtentCache::store(uint64_t offset, uint64_t length, uint32_t flags, TimePoint stamp) {
  const Extent one{offset, saturating_add(offset, length) - offset, flags};
  return store(std::span(&one, 1), stamp);
}

bool ExtentCache::store(std::span<const Extent> run, TimePoint stamp) {
  if (too_old(stamp)) return false;
  ++generation_;
  size_t i = 0;
  while (i < run.size()) {
    if (run[i].length == 0) {
      ++i;
      continue;
    }
    // One segment per contiguous stretch: a gap (a tainted piece of a fetch
    // reply) may hold another store's data, with its own stamp.
    const uint64_t start = run[i].offset;
    size_t j = i;
    while (j + 1 < run.size() && run[j + 1].offset == run[j].end()) ++j;
    const uint64_t end = run[j].end();
    carve(start, end);
    // Clear the stretch, then append its pieces in order with a hint: each
    // insertion lands right after the previous one (amortized O(1), where
    // set() searches the tree for every piece).
    map_.erase(Interval(start, end));
    auto hint = map_.lower_bound(Interval(start, start + 1));
    for (size_t k = i; k <= j; ++k) {
      if (run[k].length > 0) hint = map_.add(hint, std::make_pair(Interval(run[k].offset, run[k].end()), run[k].flags));
    }
    add_segment(start, end, stamp, generation_, budget_->next_tick(), lru_.begin());
    i = j + 1;
  }
  evict_to_limit();
  return true;
}

void ExtentCache::erase(uint64_t offset, uint64_t length) {
  if (length == 0) return;
  const uint64_t end = saturating_add(offset, length);
  carve(offset, end);
  map_.erase(Interval(offset, end));
}

void ExtentCache::clear() {
  map_.clear();
  segments_.clear();
  lru_.clear();
}

size_t ExtentCache::lookup(uint64_t offset, uint64_t limit, std::vector<Extent>& out, size_t max_count) {
  if (limit == 0 || max_count == 0) return 0;
  auto segment = segment_at(offset);
  if (segment == segments_.end()) return 0;
  if (too_old(segment->second.stamp)) {
    drop(segment);
    ++expirations_;
    return 0;
  }
  touch(segment->second);
  auto it = map_.find(offset);
  const uint64_t end = saturating_add(offset, limit);
  uint64_t pos = offset;
  size_t added = 0;
  while (pos < end) {
    if (pos == segment->second.end) {
      // Into the next segment only if it starts right here and is fresh.
      auto next = std::next(segment);
      if (next == segments_.end() || next->first != pos) break;
      if (too_old(next->second.stamp)) {
        drop(next);  // invalidates `it`: we stop here
        ++expirations_;
        break;
      }
      segment = next;
      touch(segment->second);
    }
    while (it != map_.end() && it->first.upper() <= pos) ++it;
    if (it == map_.end() || it->first.lower() > pos) break;  // unreachable: segments are covered
    // Pieces end at segment boundaries (each has its own stamp); equal
    // neighbours are joined again in `out`.
    const uint64_t piece_end = std::min({it->first.upper(), end, segment->second.end});
    if (added > 0 && out.back().flags == it->second && out.back().end() == pos) {
      out.back().length += piece_end - pos;
    } else {
      if (added == max_count) break;
      out.push_back({pos, piece_end - pos, it->second});
      ++added;
    }
    pos = piece_end;
  }
  return added;
}

size_t ExtentCache::memory_bytes() const {
  return map_.iterative_size() * kBytesPerInterval + segments_.size() * kBytesPerSegment;
}

bool ExtentCache::invariants_hold() const {
  if (lru_.size() != segments_.size()) return false;
  for (uint64_t start : lru_) {
    auto it = segments_.find(start);
    if (it == segments_.end() || *it->second.lru_pos != start) return false;
  }
  uint64_t segment_bytes = 0;
  for (const auto& [start, segment] : segments_) {
    if (segment.end <= start) return false;
    segment_bytes += segment.end - start;
    // Covered: the data inside the segment adds up to its length.
    Map inside = map_ & Interval(start, segment.end);
    if (boost::icl::length(inside) != segment.end - start) return false;
  }
  return boost::icl::length(map_) == segment_bytes;  // segments are disjoint: no data outside them
}

bool ExtentCache::too_old(TimePoint stamp) const {
  return limits_.ttl && clock_() - stamp > *limits_.ttl;
}

bool ExtentCache::over_limit() const {
  return budget_->used() > budget_->max_extents();
}

ExtentCache::Segments::iterator ExtentCache::segment_at(uint64_t offset) {
  auto it = segments_.upper_bound(offset);
  if (it == segments_.begin()) return segments_.end();
  --it;
  return offset < it->second.end ? it : segments_.end();
}

void ExtentCache::add_segment(uint64_t start, uint64_t end, TimePoint stamp, uint64_t generation, uint64_t last_used,
                              std::list<uint64_t>::iterator lru_before) {
  auto pos = lru_.insert(lru_before, start);
  segments_.emplace(start, Segment{end, stamp, generation, last_used, pos});
}

ExtentCache::Segments::iterator ExtentCache::remove_segment(Segments::iterator it) {
  lru_.erase(it->second.lru_pos);
  return segments_.erase(it);
}

void ExtentCache::drop(Segments::iterator it) {
  map_.erase(Interval(it->first, it->second.end));
  remove_segment(it);
}

void ExtentCache::carve(uint64_t start, uint64_t end) {
  // The first segment overlapping [start, end).
  auto it = segments_.upper_bound(start);
  if (it != segments_.begin() && std::prev(it)->second.end > start) --it;
  while (it != segments_.end() && it->first < end) {
    Segment& segment = it->second;
    if (it->first < start && segment.end > end) {
      // [start, end) is strictly inside: the right part becomes a segment of
      // its own, with the same stamp, just behind in recency.
      const Segment right = segment;
      segment.end = start;
      add_segment(end, right.end, right.stamp, right.generation, right.last_used, std::next(right.lru_pos));
      return;
    }
    if (it->first < start) {  // overlaps on the left: keep its left part
      segment.end = start;
      ++it;
    } else if (segment.end > end) {  // overlaps on the right: keep its right part
      auto node = segments_.extract(it);
      node.key() = end;
      *node.mapped().lru_pos = end;
      segments_.insert(std::move(node));
      return;
    } else {
      it = remove_segment(it);
    }
  }
}

void ExtentCache::touch(Segment& segment) {
  segment.last_used = budget_->next_tick();
  if (segment.lru_pos != lru_.begin()) lru_.splice(lru_.begin(), lru_, segment.lru_pos);
}

// The list's back is this cache's least recently used segment (stores and
// lookups move segments to the front with a fresh tick). The store in
// progress is this cache's newest generation, at the front: if the back is of
// it, so is every segment here.
std::optional<uint64_t> ExtentCache::evictable_tick(bool spare_newest) const {
  if (lru_.empty()) return std::nullopt;
  const Segment& oldest = segments_.find(lru_.back())->second;
  if (spare_newest && oldest.generation == generation_) return std::nullopt;
  return oldest.last_used;
}

void ExtentCache::evict_least_recent() {
  drop(segments_.find(lru_.back()));
  ++evictions_;
}

void ExtentCache::evict_to_limit() {
  // Least recently used segments first, in whichever cache sharing the
  // budget they are, never one the store in progress made. (Another cache's
  // newest generation is a finished store: fair game.)
  while (over_limit()) {
    ExtentCache* victim = nullptr;
    std::optional<uint64_t> oldest;
    for (ExtentCache* c : budget_->members_) {
      const auto tick = c->evictable_tick(c == this);
      if (tick && (!oldest || *tick < *oldest)) {
        oldest = tick;
        victim = c;
      }
    }
    if (!victim) break;
    victim->evict_least_recent();
  }
  // Only what was just stored is left and it alone is too much: keep its
  // beginning, nearest the query that caused the store.
  while (over_limit() && !segments_.empty()) trim_last_segment();
}

void ExtentCache::trim_last_segment() {
  auto last = std::prev(segments_.end());
  const uint64_t start = last->first, end = last->second.end;
  // Every other segment, here and in the caches sharing the budget, is gone:
  // this cache alone is over the limit.
  const size_t limit = budget_->max_extents();
  const size_t intervals = map_.iterative_size();
  uint64_t cut = start;
  if (intervals > limit && segments_.size() <= limit) {
    // Drop just enough intervals from the segment's end.
    size_t excess = intervals - limit;
    auto it = map_.find(end - 1);
    while (--excess > 0 && it != map_.begin() && it->first.lower() > start) --it;
    cut = std::max(start, it->first.lower());
  }
  ++evictions_;
  if (cut == start) {
    drop(last);
    return;
  }
  map_.erase(Interval(cut, end));
  last->second.end = cut;
}

}  // namespace bscache::cache
