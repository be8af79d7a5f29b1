// Capacity: window budgets, prefetch credit, bypass, window shapes, sizes.
#include <gtest/gtest.h>

#include "cache/extent_cache.hpp"
#include "policy/capacity.hpp"
#include "policy/fetch_window.hpp"

#include "test_units.hpp"

namespace bscache::policy {
namespace {
using namespace bscache::test;

TEST(Capacity, AWindowSharesTheCacheWithTheOneBeingReadAndThoseAhead) {
  EXPECT_EQ(window_extent_budget(16, 0), 8u);
  EXPECT_EQ(window_extent_budget(16, 1), 5u);
  EXPECT_EQ(window_extent_budget(1'000'000, 12), 71'428u);
  EXPECT_EQ(window_extent_budget(3, 0), 1u);
}

TEST(Capacity, PrefetchDepthShrinksToWhatTheCacheHolds) {
  EXPECT_EQ(affordable_depth(1'000'000, 12), 12u);
  EXPECT_EQ(affordable_depth(16, 12), 6u) << "8 windows of 2 extents: 2 in use, 6 ahead";
  EXPECT_GE(window_extent_budget(16, affordable_depth(16, 12)), kMinWindowExtents);
  EXPECT_EQ(affordable_depth(5, 12), 0u);
  EXPECT_EQ(affordable_depth(16, 1), 1u);
}

TEST(Capacity, PrefetchesArePaidForWithCallsAlreadySaved) {
  EXPECT_EQ(prefetch_allowance(4, 0), 0u) << "nothing saved yet: no speculation";
  EXPECT_EQ(prefetch_allowance(4, -3), 0u);
  EXPECT_EQ(prefetch_allowance(4, 2), 2u);
  EXPECT_EQ(prefetch_allowance(4, 1'000), 4u);
}

TEST(Capacity, BypassWhenNotEvenOneUsefulWindowFits) {
  EXPECT_TRUE(should_bypass(1));
  EXPECT_TRUE(should_bypass(3));
  EXPECT_FALSE(should_bypass(4));
  EXPECT_FALSE(should_bypass(1'000'000));
}

TEST(Capacity, WindowBytesFollowTheDensity) {
  EXPECT_EQ(window_bytes(8, std::nullopt, 4 * GiB), 4 * GiB) << "unknown density: the longest window";
  EXPECT_EQ(window_bytes(8, 64.0 * KiB, 4 * GiB), 512 * KiB);
  EXPECT_EQ(window_bytes(1'000'000, 1.0 * MiB, 4 * GiB), 4 * GiB) << "capped";
  EXPECT_EQ(window_bytes(0, 4096.0, 4 * GiB), 1u) << "never 0";
}

TEST(Capacity, DensityIsAMovingAverageOfBytesPerExtent) {
  DensityEstimator d;
  EXPECT_FALSE(d.bytes_per_extent());
  d.record(0, 4096);  // an empty reply teaches nothing
  EXPECT_FALSE(d.bytes_per_extent());
  d.record(4, 4 * MiB);
  EXPECT_EQ(d.bytes_per_extent(), 1.0 * MiB);
  d.record(1, 3 * MiB);
  EXPECT_EQ(d.bytes_per_extent(), 2.0 * MiB);
}

TEST(FetchWindow, ALargeQueryWithoutReqOneIsFetchedAsItCame) {
  const FetchWindow planned{1 * MiB, 512 * KiB};
  EXPECT_EQ(window_for_miss(1 * MiB, 64 * KiB, true, planned), planned) << "REQ_ONE: the cache's window";
  EXPECT_EQ(window_for_miss(1 * MiB, 256 * KiB, false, planned), planned) << "inside the window";
  EXPECT_EQ(window_for_miss(1 * MiB + 4096, 1 * GiB, false, planned), (FetchWindow{1 * MiB + 4096, 1 * GiB}))
      << "past the window: one upstream call of the client's shape";
  EXPECT_EQ(window_for_miss(1 * MiB, 16 * GiB, false, planned), planned)
      << "longer than one upstream request carries (an extended-headers client's): the cache's window";
  EXPECT_EQ(window_for_miss(1 * MiB, 16 * GiB, false, planned, UINT64_MAX), (FetchWindow{1 * MiB, 16 * GiB}))
      << "an upstream connection with extended headers carries it: the client's shape, whatever its headers";
}

TEST(Capacity, ParsesByteSizes) {
  EXPECT_EQ(parse_byte_size("268435456"), 268435456u);
  EXPECT_EQ(parse_byte_size("64K"), 64 * KiB);
  EXPECT_EQ(parse_byte_size("256M"), 256 * MiB);
  EXPECT_EQ(parse_byte_size("1G"), GiB);
  EXPECT_EQ(parse_byte_size("2GiB"), 2 * GiB);
  EXPECT_EQ(parse_byte_size("512MB"), 512 * MiB);
  for (const char* bad : {"", "M", "0", "-1M", "1.5G", "12X", "99999999999T"}) {
    EXPECT_FALSE(parse_byte_size(bad)) << bad;
  }
}

// The default memory holds a dense 4 GiB disk: 1,048,576 extents of 4 KiB.
static_assert(cache::max_extents_for_memory(cache::kDefaultMaxMemory) >= size_t{1} << 20);

}  // namespace
}  // namespace bscache::policy
