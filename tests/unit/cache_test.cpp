// ExtentCache: storing, looking up, coalescing, eviction and expiry.
#include "cache/extent_cache.hpp"

#include <gtest/gtest.h>

#include <malloc.h>

#include <random>

#include "test_units.hpp"

namespace bscache::cache {
namespace {
using namespace bscache::test;

using namespace std::chrono_literals;

std::vector<Extent> run(ExtentCache& c, uint64_t offset, uint64_t limit = ~uint64_t{0} >> 1, size_t max = 1000) {
  std::vector<Extent> out;
  c.lookup(offset, limit, out, max);
  return out;
}

TEST(ExtentCache, StoreAndLookup) {
  ExtentCache c;
  c.store(0, 64 * KiB, 3, c.now());
  c.store(64 * KiB, 64 * KiB, 0, c.now());
  EXPECT_EQ(run(c, 0), (std::vector<Extent>{{0, 64 * KiB, 3}, {64 * KiB, 64 * KiB, 0}}));
  EXPECT_TRUE(run(c, 128 * KiB).empty()) << "past the stored range is a miss";
}

TEST(ExtentCache, ZeroNextToThreeIsKept) {
  // ICL's default absorber would drop the 0 ("data") interval entirely.
  ExtentCache c;
  c.store(4096, 4096, 0, c.now());
  c.store(8192, 4096, 3, c.now());
  EXPECT_EQ(c.extent_count(), 2u);
  EXPECT_EQ(run(c, 4096), (std::vector<Extent>{{4096, 4096, 0}, {8192, 4096, 3}}));
}

TEST(ExtentCache, AdjacentEqualStatesCoalesce) {
  ExtentCache c;
  c.store(0, 4096, 0, c.now());
  c.store(4096, 4096, 0, c.now());
  c.store(8192, 4096, 2, c.now());
  c.store(12288, 4096, 2, c.now());
  EXPECT_EQ(c.extent_count(), 2u);
  EXPECT_EQ(run(c, 0), (std::vector<Extent>{{0, 8192, 0}, {8192, 8192, 2}}));
}

TEST(ExtentCache, StoreOverwritesRatherThanAggregates) {
  ExtentCache c;
  c.store(0, 16384, 3, c.now());
  c.store(4096, 4096, 0, c.now());  // a write in the middle of a hole
  EXPECT_EQ(run(c, 0), (std::vector<Extent>{{0, 4096, 3}, {4096, 4096, 0}, {8192, 8192, 3}}));
  c.store(0, 16384, 2, c.now());
  EXPECT_EQ(run(c, 0), (std::vector<Extent>{{0, 16384, 2}}));
}

TEST(ExtentCache, LookupStartsMidIntervalAndClipsToLimit) {
  ExtentCache c;
  c.store(0, 1 * MiB, 3, c.now());
  c.store(1 * MiB, 1 * MiB, 0, c.now());
  EXPECT_EQ(run(c, 512 * KiB, 64 * KiB), (std::vector<Extent>{{512 * KiB, 64 * KiB, 3}}));
  EXPECT_EQ(run(c, 512 * KiB, 1 * MiB), (std::vector<Extent>{{512 * KiB, 512 * KiB, 3}, {1 * MiB, 512 * KiB, 0}}));
  EXPECT_EQ(run(c, 512 * KiB, 10 * MiB, 1), (std::vector<Extent>{{512 * KiB, 512 * KiB, 3}})) << "max_count";
}

TEST(ExtentCache, LookupStopsAtAGap) {
  ExtentCache c;
  c.store(0, 4096, 0, c.now());
  c.store(8192, 4096, 3, c.now());
  EXPECT_EQ(run(c, 0), (std::vector<Extent>{{0, 4096, 0}}));
  EXPECT_TRUE(run(c, 4096).empty()) << "uncached offset";
}

TEST(ExtentCache, EraseAtPartialOverlaps) {
  ExtentCache c;
  c.store(0, 64 * KiB, 3, c.now());
  c.erase(16 * KiB, 16 * KiB);
  EXPECT_EQ(run(c, 0), (std::vector<Extent>{{0, 16 * KiB, 3}}));
  EXPECT_EQ(run(c, 32 * KiB), (std::vector<Extent>{{32 * KiB, 32 * KiB, 3}}));
  EXPECT_TRUE(run(c, 16 * KiB).empty());
}

// A "window": a run of extents stored at once, like a fetch reply.
std::vector<Extent> window(uint64_t base, size_t count, uint64_t each = 4096) {
  std::vector<Extent> out;
  for (size_t i = 0; i < count; ++i) out.push_back({base + i * each, each, static_cast<uint32_t>(i % 2) * 3});
  return out;
}

TEST(ExtentCache, EvictsTheLeastRecentlyUsedWindow) {
  CacheLimits limits;
  limits.max_extents = 4;
  ExtentCache c(limits);
  c.store(window(0, 2), c.now());
  c.store(window(1 * MiB, 2), c.now());
  EXPECT_EQ(c.evictions(), 0u);
  EXPECT_FALSE(run(c, 0).empty());  // window 0 is now the most recently used
  c.store(window(2 * MiB, 2), c.now());
  EXPECT_EQ(c.evictions(), 1u);
  EXPECT_TRUE(run(c, 1 * MiB).empty()) << "the least recently used window went";
  EXPECT_FALSE(run(c, 0).empty());
  EXPECT_FALSE(run(c, 2 * MiB).empty()) << "the window just stored stays";
  EXPECT_LE(c.extent_count(), 4u);
  EXPECT_TRUE(c.invariants_hold());
}

// Caches of several exports share one budget (--cache-max-extents bounds the sum).
TEST(CacheBudget, TheLeastRecentlyUsedSegmentGoesWhicheverCacheItIsIn) {
  CacheLimits limits;
  limits.budget = std::make_shared<CacheBudget>(6);
  ExtentCache a(limits), b(limits);
  EXPECT_EQ(a.max_extents(), 6u);
  a.store(window(0, 2), a.now());  // oldest
  b.store(window(0, 2), b.now());
  a.store(window(1 * MiB, 2), a.now());
  EXPECT_EQ(limits.budget->used(), 6u);
  EXPECT_FALSE(run(b, 0).empty());       // b's window is now the most recently used
  b.store(window(1 * MiB, 2), b.now());  // over by 2: a's first window goes, not b's own
  EXPECT_EQ(limits.budget->used(), 6u);
  EXPECT_EQ(a.evictions(), 1u);
  EXPECT_EQ(b.evictions(), 0u);
  EXPECT_TRUE(run(a, 0).empty());
  EXPECT_FALSE(run(a, 1 * MiB).empty());
  EXPECT_FALSE(run(b, 0).empty());
  EXPECT_FALSE(run(b, 1 * MiB).empty());
  EXPECT_TRUE(a.invariants_hold());
  EXPECT_TRUE(b.invariants_hold());
}

TEST(CacheBudget, OneCacheMayUseAllOfItAndAStoreTooLargeKeepsItsBeginning) {
  CacheLimits limits;
  limits.budget = std::make_shared<CacheBudget>(4);
  ExtentCache a(limits), b(limits);
  a.store(window(0, 2), a.now());
  b.store(window(0, 8), b.now());  // alone more than the budget: a's window goes, b keeps 4 intervals
  EXPECT_TRUE(run(a, 0).empty());
  EXPECT_EQ(b.extent_count(), 4u);
  EXPECT_EQ(run(b, 0).size(), 4u);
  EXPECT_LE(limits.budget->used(), 4u);
  EXPECT_TRUE(b.invariants_hold());
}

TEST(CacheBudget, WindowsArePlannedForAnEqualShareWhileOthersHoldExtents) {
  CacheLimits limits;
  limits.budget = std::make_shared<CacheBudget>(90);
  ExtentCache a(limits), b(limits), c(limits);
  EXPECT_EQ(a.planning_share(), 90u);
  b.store(window(0, 2), b.now());
  EXPECT_EQ(a.planning_share(), 45u);
  EXPECT_EQ(b.planning_share(), 90u) << "only b holds anything";
  a.store(window(0, 2), a.now());
  c.store(window(0, 2), c.now());
  EXPECT_EQ(a.planning_share(), 30u);
}

TEST(CacheBudget, ACacheLeavesTheBudgetWithWhatItHeld) {
  CacheLimits limits;
  limits.budget = std::make_shared<CacheBudget>(100);
  ExtentCache a(limits);
  {
    ExtentCache b(limits);
    b.store(window(0, 10), b.now());
    EXPECT_EQ(limits.budget->caches(), 2u);
    EXPECT_EQ(limits.budget->used(), 10u);
  }
  EXPECT_EQ(limits.budget->caches(), 1u);
  EXPECT_EQ(limits.budget->used(), 0u);
  a.store(window(0, 3), a.now());
  EXPECT_EQ(limits.budget->used(), 3u);
}

TEST(ExtentCache, NeighbouringWindowsAreEvictedSeparately) {
  // Three windows in the same gigabyte: evicting the oldest must not take the
  // one being read or the one just fetched with it.
  CacheLimits limits;
  limits.max_extents = 4;
  ExtentCache c(limits);
  c.store(window(0, 2), c.now());
  c.store(window(8 * KiB, 2), c.now());
  EXPECT_EQ(run(c, 8 * KiB).size(), 2u);  // a client reads the second window
  c.store(window(16 * KiB, 2), c.now());  // and the third arrives
  EXPECT_TRUE(run(c, 0).empty());
  EXPECT_EQ(run(c, 8 * KiB),
            (std::vector<Extent>{
                {8 * KiB, 4 * KiB, 0}, {12 * KiB, 4 * KiB, 3}, {16 * KiB, 4 * KiB, 0}, {20 * KiB, 4 * KiB, 3}}));
  EXPECT_TRUE(c.invariants_hold());
}

TEST(ExtentCache, AStoreLargerThanTheLimitKeepsItsBeginning) {
  CacheLimits limits;
  limits.max_extents = 3;
  ExtentCache c(limits);
  c.store(window(1 * MiB, 2), c.now());
  c.store(window(0, 8), c.now());
  EXPECT_EQ(c.extent_count(), 3u) << "the limit holds even for what was just stored";
  EXPECT_EQ(run(c, 0), window(0, 3)) << "the part nearest the query that caused it";
  EXPECT_TRUE(run(c, 1 * MiB).empty());
  EXPECT_TRUE(c.invariants_hold());
}

TEST(ExtentCache, AWriteInsideAWindowCarvesIt) {
  ExtentCache c;
  c.store(window(0, 4), c.now());
  c.store(5 * KiB, 2 * KiB, 0, c.now());
  EXPECT_EQ(c.segment_count(), 3u) << "left of the write, the write, right of it";
  EXPECT_EQ(run(c, 0), (std::vector<Extent>{{0, 4 * KiB, 0},
                                            {4 * KiB, 1 * KiB, 3},
                                            {5 * KiB, 2 * KiB, 0},
                                            {7 * KiB, 1 * KiB, 3},
                                            {8 * KiB, 4 * KiB, 0},
                                            {12 * KiB, 4 * KiB, 3}}));
  c.erase(0, 6 * KiB);
  EXPECT_EQ(c.segment_count(), 2u);
  EXPECT_TRUE(c.invariants_hold());
}

TEST(ExtentCache, ManySmallWritesAreBoundedToo) {
  // Equal neighbours coalesce into one interval, but each write is its own
  // segment: the limit counts those as well.
  CacheLimits limits;
  limits.max_extents = 4;
  ExtentCache c(limits);
  for (uint64_t i = 0; i < 10; ++i) c.store(i * 4096, 4096, 0, c.now());
  EXPECT_LE(c.segment_count(), 4u);
  EXPECT_LE(c.extent_count(), 4u);
  EXPECT_EQ(run(c, 36 * KiB), (std::vector<Extent>{{36 * KiB, 4 * KiB, 0}}));
  EXPECT_TRUE(c.invariants_hold());
}

TEST(ExtentCache, ExpiresAfterTtl) {
  auto now = std::chrono::steady_clock::time_point{} + 1h;
  CacheLimits limits;
  limits.ttl = 10s;
  ExtentCache c(limits, [&] { return now; });
  c.store(0, 4096, 3, c.now());
  now += 5s;
  c.store(1 * MiB, 4096, 3, c.now());
  now += 6s;  // window 0 is 11 s old, window 1 is 6 s old
  EXPECT_TRUE(run(c, 0).empty());
  EXPECT_EQ(c.expirations(), 1u);
  EXPECT_FALSE(run(c, 1 * MiB).empty());
  now += 5s;
  EXPECT_TRUE(run(c, 1 * MiB).empty());
  EXPECT_TRUE(c.invariants_hold());
}

TEST(ExtentCache, TtlRunStopsAtAnExpiredWindow) {
  auto now = std::chrono::steady_clock::time_point{} + 1h;
  CacheLimits limits;
  limits.ttl = 10s;
  ExtentCache c(limits, [&] { return now; });
  c.store(1 * MiB, 1 * MiB, 0, c.now());  // old
  now += 8s;
  c.store(0, 1 * MiB, 3, c.now());  // fresh, right before it
  now += 3s;
  EXPECT_EQ(run(c, 0), (std::vector<Extent>{{0, 1 * MiB, 3}}));
  EXPECT_TRUE(c.invariants_hold());
}

TEST(ExtentCache, CarvedPiecesKeepTheirOwnStamps) {
  auto now = std::chrono::steady_clock::time_point{} + 1h;
  CacheLimits limits;
  limits.ttl = 10s;
  ExtentCache c(limits, [&] { return now; });
  c.store(0, 16 * KiB, 3, c.now());
  now += 8s;
  c.store(4 * KiB, 4 * KiB, 0, c.now());  // a write inside the old window
  now += 3s;
  EXPECT_TRUE(run(c, 0).empty()) << "11 s old";
  EXPECT_EQ(run(c, 4 * KiB), (std::vector<Extent>{{4 * KiB, 4 * KiB, 0}})) << "3 s old; stops at the stale rest";
  EXPECT_TRUE(run(c, 8 * KiB).empty());
  EXPECT_TRUE(c.invariants_hold());
}

// memory_bytes() is what --cache-max-extents is sized by and what the stats
// report: it must follow the heap the cache really takes, not a constant.
TEST(ExtentCache, MemoryEstimateFollowsTheHeap) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "the sanitizer's allocator is not glibc's: mallinfo2 does not see it";
#else
  ExtentCache c;
  const size_t empty_estimate = c.memory_bytes();
  const size_t heap_before = mallinfo2().uordblks;
  constexpr uint64_t kExtents = 100'000;
  for (uint64_t i = 0; i < kExtents; ++i) c.store(i * 8192, 4096, 3, c.now());  // gaps: no coalescing
  const double heap = static_cast<double>(mallinfo2().uordblks - heap_before);
  const double estimate = static_cast<double>(c.memory_bytes() - empty_estimate);
  ASSERT_EQ(c.extent_count(), kExtents);
  EXPECT_GT(estimate, heap * 0.75) << "heap bytes per extent " << heap / kExtents;
  EXPECT_LT(estimate, heap * 1.5) << "heap bytes per extent " << heap / kExtents;
#endif
}

// What the estimate counts: each interval of the map, and each stored window
// (its LRU bookkeeping), which adjacent stores of equal flags do not share.
TEST(ExtentCache, MemoryEstimateCountsIntervalsAndStoredWindows) {
  ExtentCache c;
  const size_t empty = c.memory_bytes();
  c.store(0, 4096, 3, c.now());
  EXPECT_EQ(c.memory_bytes() - empty, kBytesPerInterval + kBytesPerSegment);
  for (uint64_t i = 1; i < 1000; ++i) c.store(i * 4096, 4096, 3, c.now());  // one interval, 1000 windows
  EXPECT_EQ(c.extent_count(), 1u);
  EXPECT_EQ(c.memory_bytes() - empty, kBytesPerInterval + 1000 * kBytesPerSegment);
  c.store(8 * MiB, 4096, 0, c.now());  // one more interval and window, apart
  EXPECT_EQ(c.extent_count(), 2u);
  EXPECT_EQ(c.memory_bytes() - empty, 2 * kBytesPerInterval + 1001 * kBytesPerSegment);
  c.clear();
  EXPECT_EQ(c.memory_bytes(), empty);
}

TEST(LookupRun, AnswersFromAReplyLikeTheCache) {
  const std::vector<Extent> reply = {{0, 4096, 3}, {4096, 4096, 3}, {8192, 8192, 0}, {24576, 4096, 2}};
  std::vector<Extent> out;
  EXPECT_EQ(lookup_run(reply, 1024, 1 << 20, out, 10), 2u);
  EXPECT_EQ(out, (std::vector<Extent>{{1024, 7168, 3}, {8192, 8192, 0}})) << "equal neighbours join; a gap ends it";
  out.clear();
  EXPECT_EQ(lookup_run(reply, 8192, 4096, out, 10), 1u);
  EXPECT_EQ(out, (std::vector<Extent>{{8192, 4096, 0}})) << "clipped to the limit";
  out.clear();
  EXPECT_EQ(lookup_run(reply, 0, 1 << 20, out, 1), 1u);
  EXPECT_EQ(out, (std::vector<Extent>{{0, 8192, 3}})) << "max_count";
  out.clear();
  EXPECT_EQ(lookup_run(reply, 16384, 4096, out, 10), 0u) << "in the gap";
  EXPECT_EQ(lookup_run(reply, 1 << 20, 4096, out, 10), 0u) << "past the end";
  EXPECT_EQ(lookup_run({}, 0, 4096, out, 10), 0u);
}

// Random stores and erases against a byte-per-block model.
class ExtentCacheModel : public ::testing::TestWithParam<unsigned> {};

TEST_P(ExtentCacheModel, MatchesANaiveModel) {
  const unsigned seed = GetParam();
  std::mt19937 rng(seed);
  constexpr uint64_t kBlocks = 256, kBlock = 512;
  ExtentCache c;
  std::vector<int> model(kBlocks, -1);  // -1: unknown
  for (int step = 0; step < 3000; ++step) {
    const uint64_t a = rng() % kBlocks, n = 1 + rng() % (kBlocks - a);
    if (rng() % 4 == 0) {
      c.erase(a * kBlock, n * kBlock);
      for (uint64_t i = a; i < a + n; ++i) model[i] = -1;
    } else {
      const uint32_t flags = rng() % 4;
      c.store(a * kBlock, n * kBlock, flags, c.now());
      for (uint64_t i = a; i < a + n; ++i) model[i] = static_cast<int>(flags);
    }
    const uint64_t q = rng() % kBlocks;
    auto got = run(c, q * kBlock);
    uint64_t pos = q;
    for (const auto& e : got) {
      ASSERT_EQ(e.offset, pos * kBlock) << "seed " << seed;
      for (uint64_t i = 0; i < e.length / kBlock; ++i) {
        ASSERT_EQ(model[pos + i], static_cast<int>(e.flags)) << "seed " << seed << " block " << pos + i;
      }
      pos += e.length / kBlock;
    }
    ASSERT_TRUE(pos == kBlocks || model[pos] == -1 || got.size() == 1000) << "run ended early, seed " << seed;
    if (got.empty()) {
      ASSERT_EQ(model[q], -1) << "seed " << seed;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Seeds, ExtentCacheModel, ::testing::Values(1u, 2u, 3u, 4u, 5u));

// Under a tiny limit whatever is cached must still be what was stored there
// last, within the limit, with the bookkeeping consistent.
TEST_P(ExtentCacheModel, EvictionNeverInventsStates) {
  const unsigned seed = GetParam();
  std::mt19937 rng(seed);
  constexpr uint64_t kBlocks = 256, kBlock = 512;
  CacheLimits limits;
  limits.max_extents = 1 + seed * 3;
  ExtentCache c(limits);
  std::vector<int> model(kBlocks, -1);
  for (int step = 0; step < 3000; ++step) {
    const uint64_t a = rng() % kBlocks, n = 1 + rng() % std::min<uint64_t>(kBlocks - a, 32);
    if (rng() % 4 == 0) {
      c.erase(a * kBlock, n * kBlock);
      for (uint64_t i = a; i < a + n; ++i) model[i] = -1;
    } else {
      std::vector<Extent> reply;
      for (uint64_t i = a; i < a + n; ++i) {
        const auto flags = static_cast<uint32_t>(rng() % 4);
        reply.push_back({i * kBlock, kBlock, flags});
        model[i] = static_cast<int>(flags);
      }
      c.store(reply, c.now());
      ASSERT_EQ(run(c, a * kBlock, kBlock, 1).size(), 1u) << "a store keeps at least its beginning, seed " << seed;
    }
    ASSERT_LE(c.extent_count(), limits.max_extents) << "seed " << seed;
    ASSERT_LE(c.segment_count(), limits.max_extents) << "seed " << seed;
    ASSERT_TRUE(c.invariants_hold()) << "seed " << seed << " step " << step;
    const uint64_t q = rng() % kBlocks;
    for (const auto& e : run(c, q * kBlock)) {
      for (uint64_t i = e.offset / kBlock; i < e.end() / kBlock; ++i) {
        ASSERT_EQ(model[i], static_cast<int>(e.flags)) << "seed " << seed << " block " << i;
      }
    }
  }
}

}  // namespace
}  // namespace bscache::cache
