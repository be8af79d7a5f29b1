// Policy: fetch windows, prefetch depth, durations, coherence, write effects.
#include <gtest/gtest.h>

#include "policy/coherence.hpp"
#include "policy/fetch_window.hpp"
#include "policy/prefetch.hpp"

#include "test_units.hpp"

namespace bscache::policy {
namespace {
using namespace bscache::test;

using namespace std::chrono_literals;

TEST(FetchWindow, LargestAlignedWindowClippedAtTheEnd) {
  EXPECT_EQ(plan_fetch(0, 64 * GiB, 512), (FetchWindow{0, uint64_t{0xffffffffu} / 512 * 512}));
  EXPECT_EQ(plan_fetch(3 * GiB, 4 * GiB, 512), (FetchWindow{3 * GiB, GiB}));
  EXPECT_EQ(plan_fetch(1000, 4 * GiB, 512), (FetchWindow{512, uint64_t{0xffffffffu} / 512 * 512}));
  EXPECT_EQ(plan_fetch(4 * GiB, 4 * GiB, 512).length, 0u);
  EXPECT_EQ(plan_fetch(0, 4 * GiB, 0, 1 << 20), (FetchWindow{0, 1 << 20})) << "min_block 0 means 1";
  EXPECT_EQ(plan_fetch(0, 4 * GiB, 4096, 100), (FetchWindow{0, 4096})) << "never below one block";
  // Window ends rounded down to the allocation unit, never past the query or the export's end.
  constexpr uint64_t KiB64 = uint64_t{64} * 1024;
  EXPECT_EQ(plan_fetch(1000, 4 * GiB, 0, 300'000, KiB64), (FetchWindow{1000, 4 * KiB64 - 1000}));
  EXPECT_EQ(plan_fetch(1000, 4 * GiB, 0, 5'000, KiB64), (FetchWindow{1000, 5'000})) << "the query stays inside";
  EXPECT_EQ(plan_fetch(GiB - 1000, GiB, 0, 300'000, KiB64), (FetchWindow{GiB - 1000, 1000})) << "the export's end";
  EXPECT_EQ(plan_fetch(512, 4 * GiB, 512, 300'000, 1000).length, 300'000u / 512 * 512) << "unit not a block multiple";
}

TEST(FetchWindow, TheConnectionsRequestLimitCapsTheWindow) {
  constexpr uint64_t unlimited = UINT64_MAX;
  // A connection with 64-bit requests (extended headers): one window spans the export.
  EXPECT_EQ(plan_fetch(0, 64 * GiB, 512, unlimited, 1, unlimited), (FetchWindow{0, 64 * GiB}));
  EXPECT_EQ(plan_fetch(1000, 64 * GiB, 512, unlimited, 1, unlimited), (FetchWindow{512, 64 * GiB - 512}));
  // --fetch-window still caps it.
  EXPECT_EQ(plan_fetch(0, 64 * GiB, 512, 8 * GiB, 1, unlimited), (FetchWindow{0, 8 * GiB}));
  // Without them: the 32-bit limit, whatever --fetch-window says.
  EXPECT_EQ(plan_fetch(0, 64 * GiB, 512, unlimited, 1, kMaxRequestLength),
            (FetchWindow{0, uint64_t{0xffffffffu} / 512 * 512}));
  EXPECT_EQ(plan_fetch(0, 64 * GiB, 512, unlimited), plan_fetch(0, 64 * GiB, 512, unlimited, 1, kMaxRequestLength))
      << "the 32-bit limit is the default";
}

TEST(Prefetch, DepthFollowsLatency) {
  PrefetchConfig config;
  EXPECT_EQ(prefetch_depth(config, 0ms), 1u);
  EXPECT_EQ(prefetch_depth(config, 4ms), 1u);
  EXPECT_EQ(prefetch_depth(config, 5ms), 2u);
  EXPECT_EQ(prefetch_depth(config, 50ms), 11u);
  EXPECT_EQ(prefetch_depth(config, 10s), config.max_depth);
  config.enabled = false;
  EXPECT_EQ(prefetch_depth(config, 50ms), 0u);
}

TEST(Prefetch, TriggersOnceAScanIsAnEighthIntoAWindow) {
  EXPECT_FALSE(should_prefetch(0, 0, 4 * GiB, 64 * GiB)) << "the first look-up in a window";
  EXPECT_FALSE(should_prefetch(GiB / 4, 0, 4 * GiB, 64 * GiB));
  EXPECT_TRUE(should_prefetch(GiB / 2, 0, 4 * GiB, 64 * GiB));
  EXPECT_TRUE(should_prefetch(3 * GiB, 0, 4 * GiB, 64 * GiB));
  EXPECT_FALSE(should_prefetch(3 * GiB, 0, 4 * GiB, 4 * GiB)) << "the window reaches the export end";
  EXPECT_FALSE(should_prefetch(5 * GiB, 0, 4 * GiB, 64 * GiB)) << "outside the window";
}

TEST(Prefetch, LatencyEstimateIsAMovingAverage) {
  LatencyEstimator e;
  EXPECT_EQ(e.estimate(), 0ns);
  e.record(40ms);
  EXPECT_EQ(e.estimate(), 40ms);
  e.record(0ms);
  EXPECT_EQ(e.estimate(), 30ms);
}

TEST(Coherence, ParsesDurations) {
  EXPECT_EQ(parse_duration("250ms"), 250ms);
  EXPECT_EQ(parse_duration("30s"), 30s);
  EXPECT_EQ(parse_duration("1.5s"), 1500ms);
  EXPECT_EQ(parse_duration("5m"), 5min);
  EXPECT_EQ(parse_duration("1h"), 1h);
  EXPECT_EQ(parse_duration("100us"), 100us);
  EXPECT_EQ(parse_duration("2"), 2s);
  for (const char* bad : {"", "s", "-1s", "10 s", "10sec", "1e400s", "nan"}) {
    EXPECT_FALSE(parse_duration(bad)) << bad;
  }
}

TEST(Coherence, ParsesPolicies) {
  EXPECT_EQ(parse_policy("exclusive")->mode, CoherenceMode::Exclusive);
  EXPECT_EQ(parse_policy("off")->mode, CoherenceMode::Off);
  auto ttl = parse_policy("ttl=1.5s");
  ASSERT_TRUE(ttl);
  EXPECT_EQ(ttl->mode, CoherenceMode::Ttl);
  EXPECT_EQ(ttl->ttl, 1500ms);
  EXPECT_EQ(ttl->describe(), "ttl=1500ms");
  EXPECT_FALSE(parse_policy("ttl=0s"));
  EXPECT_FALSE(parse_policy("ttl="));
  EXPECT_FALSE(parse_policy("sometimes"));
}

TEST(Coherence, WhatMutationsLeaveBehind) {
  EXPECT_EQ(state_after(Mutation::Write), 0u);
  EXPECT_EQ(state_after(Mutation::Trim), 0u) << "contents are undefined after TRIM";
  EXPECT_EQ(state_after(Mutation::WriteZeroes), 2u) << "ZERO, never HOLE";
}

}  // namespace
}  // namespace bscache::policy
