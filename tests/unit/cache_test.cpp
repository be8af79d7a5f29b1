// ExtentCache: storing, looking up, coalescing, eviction and expiry.
#include "cache/extent_cache.hpp"

#include <gtest/gtest.h>

#include <malloc.h>

#include <random>

namespace bscache::cache {
namespace {

using namespace std::chrono_literals;
constexpr uint64_t KiB = 1024, MiB = 1024 * KiB, GiB = 1024 * MiB;

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

TEST(ExtentCache, EvictsLeastRecentlyUsedGranule) {
  CacheLimits limits;
  limits.max_extents = 4;
  limits.granule_bytes = 1 * MiB;
  ExtentCache c(limits);
  auto fill = [&](uint64_t base) {  // two intervals per granule
    c.store(base, 4096, 0, c.now());
    c.store(base + 4096, 4096, 3, c.now());
  };
  fill(0);
  fill(1 * MiB);
  EXPECT_EQ(c.evictions(), 0u);
  EXPECT_FALSE(run(c, 0).empty());  // granule 0 is now the most recently used
  fill(2 * MiB);                    // over the limit: granule 1 goes
  EXPECT_EQ(c.evictions(), 1u);
  EXPECT_TRUE(run(c, 1 * MiB).empty());
  EXPECT_FALSE(run(c, 0).empty());
  EXPECT_FALSE(run(c, 2 * MiB).empty());
  EXPECT_LE(c.extent_count(), 4u);
}

TEST(ExtentCache, ASingleOversizedGranuleIsKept) {
  CacheLimits limits;
  limits.max_extents = 2;
  limits.granule_bytes = 1 * GiB;
  ExtentCache c(limits);
  for (uint64_t i = 0; i < 8; ++i) c.store(i * 4096, 4096, static_cast<uint32_t>(i % 2), c.now());
  EXPECT_EQ(c.extent_count(), 8u) << "the granule just stored is never evicted";
  EXPECT_EQ(c.evictions(), 0u);
}

TEST(ExtentCache, ExpiresAfterTtl) {
  auto now = std::chrono::steady_clock::time_point{} + 1h;
  CacheLimits limits;
  limits.ttl = 10s;
  limits.granule_bytes = 1 * MiB;
  ExtentCache c(limits, [&] { return now; });
  c.store(0, 4096, 3, c.now());
  now += 5s;
  c.store(1 * MiB, 4096, 3, c.now());
  now += 6s;  // granule 0 is 11 s old, granule 1 is 6 s old
  EXPECT_TRUE(run(c, 0).empty());
  EXPECT_EQ(c.expirations(), 1u);
  EXPECT_FALSE(run(c, 1 * MiB).empty());
  now += 5s;
  EXPECT_TRUE(run(c, 1 * MiB).empty());
}

TEST(ExtentCache, TtlRunStopsAtAnExpiredGranule) {
  auto now = std::chrono::steady_clock::time_point{} + 1h;
  CacheLimits limits;
  limits.ttl = 10s;
  limits.granule_bytes = 1 * MiB;
  ExtentCache c(limits, [&] { return now; });
  c.store(1 * MiB, 1 * MiB, 0, c.now());  // granule 1, old
  now += 8s;
  c.store(0, 1 * MiB, 3, c.now());  // granule 0, fresh
  now += 3s;
  EXPECT_EQ(run(c, 0), (std::vector<Extent>{{0, 1 * MiB, 3}}));
}

TEST(ExtentCache, StoringIntoAStaleGranuleRefreshesIt) {
  auto now = std::chrono::steady_clock::time_point{} + 1h;
  CacheLimits limits;
  limits.ttl = 10s;
  limits.granule_bytes = 1 * MiB;
  ExtentCache c(limits, [&] { return now; });
  c.store(0, 4096, 3, c.now());
  now += 11s;
  c.store(8192, 4096, 0, c.now());
  EXPECT_TRUE(run(c, 0).empty()) << "old data went with the stale granule";
  EXPECT_EQ(run(c, 8192), (std::vector<Extent>{{8192, 4096, 0}}));
}

// memory_bytes() is what --cache-max-extents is sized by and what the stats
// report: it must follow the heap the cache really takes, not a constant.
TEST(ExtentCache, MemoryEstimateFollowsTheHeap) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "AddressSanitizer's allocator is not glibc's: mallinfo2 does not see it";
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

TEST(ExtentCache, MemoryEstimateCountsStoredIntervalsNotStores) {
  ExtentCache c;
  const size_t empty = c.memory_bytes();
  c.store(0, 4096, 3, c.now());
  const size_t one = c.memory_bytes();
  EXPECT_GT(one, empty);
  for (uint64_t i = 1; i < 1000; ++i) c.store(i * 4096, 4096, 3, c.now());  // coalesces into the first
  EXPECT_EQ(c.memory_bytes(), one);
  c.store(4096, 4096, 0, c.now());  // splits it in three
  const size_t three = c.memory_bytes();
  c.store(8 * MiB, 4096, 3, c.now());  // one more interval, apart, in the same granule
  const size_t per_interval = c.memory_bytes() - three;
  EXPECT_GT(per_interval, 0u);
  EXPECT_EQ(three - one, 2 * per_interval);
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

}  // namespace
}  // namespace bscache::cache
