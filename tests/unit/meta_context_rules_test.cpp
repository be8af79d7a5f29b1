// The rules that let bscache cache a meta context: which contexts it knows,
// what a mutation leaves in each (policy/meta_context.hpp), and CoherentCache
// keeping several contexts under one taint tracker, each rounded out to its
// own granularity, only base:allocation remembering what mutations leave.
#include <gtest/gtest.h>

#include "cache/coherent_cache.hpp"
#include "policy/meta_context.hpp"

#include "test_units.hpp"

namespace bscache {
namespace {
using namespace bscache::test;
using policy::ContextKind;

TEST(MetaContext, KnowsBaseAllocationAllocationDepthAndNamedDirtyBitmaps) {
  EXPECT_EQ(policy::context_kind("base:allocation"), ContextKind::BaseAllocation);
  EXPECT_EQ(policy::context_kind("qemu:allocation-depth"), ContextKind::AllocationDepth);
  EXPECT_EQ(policy::context_kind("qemu:dirty-bitmap:bm0"), ContextKind::DirtyBitmap);
  EXPECT_EQ(policy::context_kind("qemu:dirty-bitmap:"), ContextKind::Unknown) << "a query prefix, not a bitmap";
  EXPECT_EQ(policy::context_kind("qemu:allocation-depth-2"), ContextKind::Unknown);
  EXPECT_EQ(policy::context_kind("base:allocation2"), ContextKind::Unknown);
  EXPECT_FALSE(policy::cacheable(ContextKind::Unknown));
  EXPECT_TRUE(policy::cacheable(ContextKind::DirtyBitmap));
}

TEST(MetaContext, OnlyBaseAllocationHasAStateAfterAMutation) {
  for (auto m : {policy::Mutation::Write, policy::Mutation::Trim, policy::Mutation::WriteZeroes}) {
    EXPECT_EQ(policy::state_after(ContextKind::BaseAllocation, m), policy::state_after(m));
    EXPECT_FALSE(policy::state_after(ContextKind::AllocationDepth, m));
    EXPECT_FALSE(policy::state_after(ContextKind::DirtyBitmap, m));
  }
}

TEST(MetaContext, ABitmapsGranuleIsBoundedByTheBoundariesItsRepliesShow) {
  policy::BitmapGranularity g;
  EXPECT_EQ(g.bound(), uint64_t{1} << 31) << "nothing seen: qemu's largest granule";
  g.saw_boundary(0);
  EXPECT_EQ(g.bound(), uint64_t{1} << 31);
  g.saw_boundary(3 * 1024 * KiB);  // 3 MiB: a multiple of 1 MiB, not 2
  EXPECT_EQ(g.bound(), 1024 * KiB);
  g.saw_boundary(1024 * KiB + 64 * KiB);
  EXPECT_EQ(g.bound(), 64 * KiB);
  g.saw_boundary(8 * 1024 * KiB);
  EXPECT_EQ(g.bound(), 64 * KiB) << "never grows";
  g.reset();
  EXPECT_EQ(g.bound(), uint64_t{1} << 31);
}

constexpr uint32_t kClean = 0, kDirty = 1;  // a dirty bitmap's states

// base:allocation (context 0, 64 KiB units) beside a dirty bitmap (256 KiB
// granules) that only forgets.
class SeveralContexts : public ::testing::Test {
 protected:
  SeveralContexts() : cache(limits()) { bitmap = cache.add_context(256 * KiB, false); }
  static cache::CacheLimits limits() {
    cache::CacheLimits l;
    l.allocation_granularity = 64 * KiB;
    return l;
  }
  std::optional<uint32_t> state_at(size_t context, uint64_t offset) {
    std::vector<cache::Extent> out;
    if (cache.extents(context).lookup(offset, 4096, out, 1) == 0) return std::nullopt;
    return out[0].flags;
  }
  void fill_both() {
    const std::vector<cache::Extent> base{{0, 1024 * KiB, kHoleZero}}, dirty{{0, 1024 * KiB, kClean}};
    const std::vector<cache::CoherentCache::ContextReply> replies{{0, base}, {bitmap, dirty}};
    cache.complete_fetch(cache.begin_fetch(), replies, 1024 * KiB);
  }
  cache::CoherentCache cache;
  size_t bitmap = 0;
};

TEST_F(SeveralContexts, OneFetchFillsBothAndAWriteRacingItTaintsEachByItsOwnGranularity) {
  auto fetch = cache.begin_fetch();
  auto write = cache.begin_mutation(260 * KiB, 4 * KiB);
  cache.complete_mutation(write, 260 * KiB, 4 * KiB, kData);
  const std::vector<cache::Extent> base{{0, 1024 * KiB, kHoleZero}}, dirty{{0, 1024 * KiB, kClean}};
  const std::vector<cache::CoherentCache::ContextReply> replies{{0, base}, {bitmap, dirty}};
  const auto outcomes = cache.complete_fetch(fetch, replies, 1024 * KiB);
  ASSERT_EQ(outcomes.size(), 2u);
  EXPECT_EQ(state_at(0, 256 * KiB), std::nullopt) << "the written unit";
  EXPECT_EQ(state_at(0, 260 * KiB), kData) << "what the write left";
  EXPECT_EQ(state_at(0, 320 * KiB), kHoleZero) << "beyond the unit: the fetch's";
  EXPECT_EQ(state_at(bitmap, 300 * KiB), std::nullopt) << "the granule the write may have dirtied";
  EXPECT_EQ(state_at(bitmap, 512 * KiB), kClean);
  EXPECT_EQ(state_at(bitmap, 0), kClean);
}

TEST_F(SeveralContexts, AContextThatDoesNotRememberMutationsOnlyForgets) {
  fill_both();
  auto zero = cache.begin_mutation(0, 512 * KiB);
  cache.complete_mutation(zero, 0, 512 * KiB, kZero);
  EXPECT_EQ(state_at(0, 0), kZero);
  EXPECT_EQ(state_at(bitmap, 0), std::nullopt) << "never a state a mutation is assumed to leave";
  EXPECT_EQ(state_at(bitmap, 508 * KiB), std::nullopt);
  EXPECT_EQ(state_at(bitmap, 512 * KiB), kClean);
}

TEST_F(SeveralContexts, AGranularityThatShrinksWhileAWriteIsOutStillForgetsTheUnitItNowNames) {
  fill_both();
  cache.set_granularity(bitmap, 1024 * KiB);
  auto write = cache.begin_mutation(4 * KiB, 4 * KiB);  // forgets [0, 1 MiB) of the bitmap
  cache.set_granularity(bitmap, 64 * KiB);
  const std::vector<cache::Extent> dirty{{0, 1024 * KiB, kClean}};
  const std::vector<cache::CoherentCache::ContextReply> replies{{bitmap, dirty}};
  auto fetch = cache.begin_fetch();  // sent while the write is out
  cache.complete_fetch(fetch, replies, 1024 * KiB);
  cache.complete_mutation(write, 4 * KiB, 4 * KiB, kData);
  EXPECT_EQ(state_at(bitmap, 0), std::nullopt);
  EXPECT_EQ(state_at(bitmap, 60 * KiB), std::nullopt);
  EXPECT_EQ(state_at(bitmap, 64 * KiB), kClean);
}

TEST_F(SeveralContexts, AnExportsContextsShareOnePlanningShare) {
  fill_both();
  EXPECT_EQ(cache.extents(0).planning_share(), cache.extents(0).max_extents())
      << "its own bitmap is not another holder";
}

}  // namespace
}  // namespace bscache
