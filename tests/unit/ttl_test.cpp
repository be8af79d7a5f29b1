// --policy ttl=D bounds staleness from when upstream was asked, not from when
// its reply arrived: every cached state carries the send time of the command
// that established it, and is a miss once that is more than D ago. A fake
// clock drives the interleavings (fetch sent, outside write, reply arrives).
#include <gtest/gtest.h>

#include "cache/coherent_cache.hpp"
#include "cache/extent_cache.hpp"

#include "test_units.hpp"

namespace bscache::cache {
namespace {
using namespace bscache::test;

using namespace std::chrono_literals;

class Ttl : public ::testing::Test {
 protected:
  Ttl() : cache(limits(), [this] { return now; }) {}
  static CacheLimits limits() {
    CacheLimits l;
    l.ttl = 1s;
    l.allocation_granularity = 64 * KiB;
    return l;
  }
  std::optional<uint32_t> state_at(uint64_t offset) {
    std::vector<Extent> out;
    if (cache.extents().lookup(offset, 4096, out, 1) == 0) return std::nullopt;
    return out[0].flags;
  }
  static std::vector<Extent> hole_reply() { return {{0, 1 * MiB, kHoleZero}}; }

  TimePoint now = TimePoint{} + 1h;
  CoherentCache cache;
};

TEST_F(Ttl, AgeCountsFromWhenTheFetchWasSent) {
  auto fetch = cache.begin_fetch();
  now += 600ms;  // upstream is slow
  auto outcome = cache.complete_fetch(fetch, hole_reply(), 1 * MiB);
  EXPECT_EQ(outcome.stored, 1u);
  EXPECT_EQ(state_at(0), kHoleZero) << "600 ms old: still fresh";
  now += 300ms;
  EXPECT_EQ(state_at(0), kHoleZero) << "900 ms since sent";
  now += 200ms;
  EXPECT_EQ(state_at(0), std::nullopt) << "1.1 s since sent, only 500 ms since the reply arrived: expired";
}

TEST_F(Ttl, AReplyOlderThanTheTtlAnswersItsWaitersButIsNotStored) {
  // Upstream computes a hole, an outside writer fills the range, and the
  // reply arrives 3 s after it was asked for.
  auto fetch = cache.begin_fetch();
  now += 3s;
  auto outcome = cache.complete_fetch(fetch, hole_reply(), 1 * MiB);
  EXPECT_EQ(outcome.usable, hole_reply()) << "the queries waiting on it get the reply, as a pass-through would";
  EXPECT_EQ(outcome.stored, 0u);
  EXPECT_EQ(state_at(0), std::nullopt) << "but nothing is cached: it was stale on arrival";
  EXPECT_EQ(cache.extents().extent_count(), 0u);
}

TEST_F(Ttl, EachWindowAgesFromItsOwnFetch) {
  auto slow = cache.begin_fetch();
  now += 500ms;
  auto fast = cache.begin_fetch();
  cache.complete_fetch(fast, {{512 * KiB, 64 * KiB, kData}}, 1 * MiB);
  cache.complete_fetch(slow, {{0, 64 * KiB, kHoleZero}}, 1 * MiB);  // arrives later, asked earlier
  now += 600ms;  // the slow reply's stamp is 1.1 s old, the fast one's 600 ms
  EXPECT_EQ(state_at(0), std::nullopt);
  EXPECT_EQ(state_at(512 * KiB), kData);
  now += 500ms;
  EXPECT_EQ(state_at(512 * KiB), std::nullopt);
}

TEST_F(Ttl, ZeroClaimAgesFromWhenTheZeroWasSent) {
  // An outside write completing while our WRITE_ZEROES is in flight may land
  // after it: the ZERO claim is only as fresh as the moment we sent the zero.
  auto zero = cache.begin_mutation(0, 128 * KiB);
  now += 800ms;
  cache.complete_mutation(zero, 0, 128 * KiB, kZero);
  EXPECT_EQ(state_at(64 * KiB), kZero);
  now += 300ms;  // 1.1 s after the zero was sent, 300 ms after it completed
  EXPECT_EQ(state_at(64 * KiB), std::nullopt);
}

TEST_F(Ttl, ZeroSlowerThanTheTtlLeavesOnlyData) {
  auto zero = cache.begin_mutation(0, 128 * KiB);
  now += 1500ms;
  cache.complete_mutation(zero, 0, 128 * KiB, kZero);
  EXPECT_EQ(state_at(64 * KiB), kData) << "the ZERO claim is stale on arrival; data is always safe";
}

TEST_F(Ttl, DataLeftByAWriteAgesFromItsCompletion) {
  auto write = cache.begin_mutation(0, 64 * KiB);
  now += 700ms;
  cache.complete_mutation(write, 0, 64 * KiB, kData);
  now += 700ms;  // 1.4 s after it was sent, 700 ms after it completed
  EXPECT_EQ(state_at(0), kData);
  now += 400ms;
  EXPECT_EQ(state_at(0), std::nullopt) << "still at most one TTL old: a trim behind our back shows within it";
}

TEST(ExtentCacheTtl, StoreRefusesAStampOlderThanTheTtl) {
  TimePoint now = TimePoint{} + 1h;
  CacheLimits limits;
  limits.ttl = 10s;
  ExtentCache c(limits, [&] { return now; });
  EXPECT_FALSE(c.store(0, 4096, kHoleZero, now - 11s));
  EXPECT_EQ(c.extent_count(), 0u);
  EXPECT_TRUE(c.store(0, 4096, kHoleZero, now - 9s));
  now += 2s;
  std::vector<Extent> out;
  EXPECT_EQ(c.lookup(0, 4096, out, 1), 0u) << "11 s after its stamp";
}

TEST(ExtentCacheTtl, WithoutATtlStampsDoNotExpire) {
  TimePoint now = TimePoint{} + 1h;
  ExtentCache c(CacheLimits{}, [&] { return now; });
  EXPECT_TRUE(c.store(0, 4096, kHoleZero, now - 24h));
  now += 24h;
  std::vector<Extent> out;
  EXPECT_EQ(c.lookup(0, 4096, out, 1), 1u);
}

}  // namespace
}  // namespace bscache::cache
