// CoherentCache: the race rule, with explicit interleavings of a block-status
// fetch and mutations, as the proxy drives them (begin = sent upstream,
// complete = reply received).
#include "cache/coherent_cache.hpp"

#include <gtest/gtest.h>

#include "test_units.hpp"

namespace bscache::cache {
namespace {
using namespace bscache::test;

class Race : public ::testing::Test {
 protected:
  Race() : cache(limits()) {}
  static CacheLimits limits() {
    CacheLimits l;
    l.allocation_granularity = 64 * KiB;
    return l;
  }
  // What a client asking with REQ_ONE at `offset` would be told (nullopt: miss).
  std::optional<uint32_t> state_at(uint64_t offset) {
    std::vector<Extent> out;
    if (cache.extents().lookup(offset, 4096, out, 1) == 0) return std::nullopt;
    return out[0].flags;
  }
  // Upstream's view before any write: the first 1 MiB is one big hole.
  std::vector<Extent> hole_reply() { return {{0, 1024 * KiB, kHoleZero}}; }

  CoherentCache cache;
};

TEST_F(Race, FetchSentThenWriteStartsAndCompletesThenReplyArrives) {
  auto fetch = cache.begin_fetch();
  auto write = cache.begin_mutation(256 * KiB, 64 * KiB);
  cache.complete_mutation(write, 256 * KiB, 64 * KiB, kData);
  cache.complete_fetch(fetch, hole_reply(), 1024 * KiB);  // describes the disk before the write
  EXPECT_EQ(state_at(256 * KiB), kData) << "the stale hole must not overwrite the write";
  EXPECT_EQ(state_at(0), kHoleZero) << "untouched parts of the reply are stored";
  EXPECT_EQ(state_at(512 * KiB), kHoleZero);
}

TEST_F(Race, WriteInFlightWhenFetchSentReplyBeforeWriteCompletes) {
  auto write = cache.begin_mutation(256 * KiB, 64 * KiB);
  auto fetch = cache.begin_fetch();
  cache.complete_fetch(fetch, hole_reply(), 1024 * KiB);
  EXPECT_EQ(state_at(256 * KiB), std::nullopt) << "unknown while the write is in flight";
  cache.complete_mutation(write, 256 * KiB, 64 * KiB, kData);
  EXPECT_EQ(state_at(256 * KiB), kData);
}

TEST_F(Race, FetchSentThenWriteStartsReplyArrivesThenWriteCompletes) {
  auto fetch = cache.begin_fetch();
  auto write = cache.begin_mutation(256 * KiB, 64 * KiB);
  cache.complete_fetch(fetch, hole_reply(), 1024 * KiB);
  EXPECT_EQ(state_at(256 * KiB), std::nullopt);
  cache.complete_mutation(write, 256 * KiB, 64 * KiB, kData);
  EXPECT_EQ(state_at(256 * KiB), kData);
}

TEST_F(Race, WriteCompletedBeforeFetchSentIsNotATaint) {
  auto write = cache.begin_mutation(256 * KiB, 64 * KiB);
  cache.complete_mutation(write, 256 * KiB, 64 * KiB, kData);
  auto fetch = cache.begin_fetch();
  std::vector<Extent> fresh = {
      {0, 256 * KiB, kHoleZero}, {256 * KiB, 64 * KiB, kData}, {320 * KiB, 704 * KiB, kHoleZero}};
  cache.complete_fetch(fetch, fresh, 1024 * KiB);
  EXPECT_EQ(state_at(256 * KiB), kData);
  EXPECT_EQ(state_at(0), kHoleZero);
  EXPECT_EQ(state_at(400 * KiB), kHoleZero);
}

TEST_F(Race, MutationForgetsItsRangeAtOnceRoundedToAllocationUnits) {
  cache.complete_fetch(cache.begin_fetch(), hole_reply(), 1024 * KiB);
  auto write = cache.begin_mutation(260 * KiB, 4 * KiB);
  EXPECT_EQ(state_at(256 * KiB), std::nullopt) << "the whole 64 KiB unit is unknown";
  EXPECT_EQ(state_at(316 * KiB), std::nullopt);
  EXPECT_EQ(state_at(320 * KiB), kHoleZero) << "the next unit is untouched";
  cache.complete_mutation(write, 260 * KiB, 4 * KiB, kData);
  EXPECT_EQ(state_at(260 * KiB), kData);
  EXPECT_EQ(state_at(256 * KiB), std::nullopt) << "upstream may now report the unit allocated";
}

TEST_F(Race, FailedMutationLeavesItsRangeUnknown) {
  cache.complete_fetch(cache.begin_fetch(), hole_reply(), 1024 * KiB);
  auto write = cache.begin_mutation(256 * KiB, 64 * KiB);
  cache.complete_mutation(write, 256 * KiB, 64 * KiB, std::nullopt);
  EXPECT_EQ(state_at(256 * KiB), std::nullopt);
  EXPECT_EQ(state_at(0), kHoleZero);
}

TEST_F(Race, ZeroClaimsZeroOnlyForWholeUnits) {
  auto zero = cache.begin_mutation(32 * KiB, 160 * KiB);  // 32K..192K: whole units 64K..192K
  cache.complete_mutation(zero, 32 * KiB, 160 * KiB, kZero);
  EXPECT_EQ(state_at(32 * KiB), kData) << "a partly zeroed unit may be reported as data";
  EXPECT_EQ(state_at(64 * KiB), kZero);
  EXPECT_EQ(state_at(188 * KiB), kZero);
}

TEST_F(Race, OverlappingZeroAndWriteNeverClaimZeroOverTheOverlap) {
  // A zero and a write to the same range are in flight at once; upstream may
  // apply them in either order, and the zero's reply may come last.
  auto zero = cache.begin_mutation(0, 256 * KiB);
  auto write = cache.begin_mutation(64 * KiB, 64 * KiB);
  cache.complete_mutation(write, 64 * KiB, 64 * KiB, kData);
  cache.complete_mutation(zero, 0, 256 * KiB, kZero);
  EXPECT_EQ(state_at(64 * KiB), kData);
  EXPECT_EQ(state_at(100 * KiB), kData);
  EXPECT_EQ(state_at(192 * KiB), kZero) << "outside the overlap the zero stands";
}

TEST_F(Race, FetchClippedToTheExportEnd) {
  std::vector<Extent> reply = {{0, 2048 * KiB, kHoleZero}};
  cache.complete_fetch(cache.begin_fetch(), reply, 1024 * KiB);
  EXPECT_EQ(state_at(1020 * KiB), kHoleZero);
  EXPECT_EQ(state_at(1024 * KiB), std::nullopt);
}

TEST_F(Race, AReplyLargerThanTheCacheAnswersInFullButStoresItsBeginning) {
  std::vector<Extent> reply;
  for (uint64_t i = 0; i < 16; ++i) reply.push_back({i * 64 * KiB, 64 * KiB, i % 2 ? kHoleZero : kData});
  auto write = cache.begin_mutation(128 * KiB, 64 * KiB);  // races the fetch below
  auto fetch = cache.begin_fetch();
  cache.complete_mutation(write, 128 * KiB, 64 * KiB, kData);
  auto outcome = cache.complete_fetch(fetch, reply, 1024 * KiB, 4);
  EXPECT_EQ(outcome.usable.size(), 15u) << "all but the tainted piece may answer the waiting queries";
  EXPECT_EQ(outcome.stored, 4u);
  EXPECT_EQ(state_at(0), kData);
  EXPECT_EQ(state_at(128 * KiB), kData) << "the write's state, not the reply's";
  EXPECT_EQ(state_at(256 * KiB), kData) << "the fourth usable extent";
  EXPECT_EQ(state_at(320 * KiB), std::nullopt) << "not stored: more than the cache may take";
}

TEST(TaintTracker, TaintIsTheUnionOfOverlappingMutations) {
  TaintTracker t;
  auto m1 = t.begin_mutation(0, 100);
  auto f = t.begin_fetch();  // m1 in flight: tainted by it
  auto m2 = t.begin_mutation(200, 50);
  t.finish(m1);
  auto m3 = t.begin_mutation(400, 10);
  auto taint = t.finish(f);
  EXPECT_TRUE(boost::icl::contains(taint, RangeSet::interval_type(0, 100)));
  EXPECT_TRUE(boost::icl::contains(taint, RangeSet::interval_type(200, 250)));
  EXPECT_TRUE(boost::icl::contains(taint, RangeSet::interval_type(400, 410)));
  EXPECT_FALSE(boost::icl::intersects(taint, RangeSet::interval_type(100, 200)));
  EXPECT_EQ(boost::icl::cardinality(t.finish(m3)), 50u) << "m3 began while m2 was pending";
  EXPECT_EQ(boost::icl::cardinality(t.finish(m2)), 110u) << "m1 was pending when m2 began; m3 began during m2";
  EXPECT_EQ(t.pending(), 0u);
  EXPECT_TRUE(t.finish(12345).empty()) << "unknown ticket";
}

}  // namespace
}  // namespace bscache::cache
