// BlockStatusService caching the qemu: meta contexts: a dirty bitmap and the
// allocation depth are answered from the cache like base:allocation (windows
// fetched without REQ_ONE, one upstream call filling every context a client
// asked about), and a mutation forgets their range instead of leaving a
// state: no depth and no "clean" is safe to assume after a write. A dirty
// bitmap is forgotten around a write by its granule, as far as its replies
// tell it, and by 2 GiB before they tell anything.
#include "block_status_service_fixture.hpp"

namespace bscache::proxy {
namespace {

using namespace testing_fixture;

constexpr uint64_t kKiB = 1024;
constexpr uint32_t kDirty = 1;
const std::string kBitmap = "qemu:dirty-bitmap:b";
const std::string kDepth = "qemu:allocation-depth";
const std::string kBase = "base:allocation";

class ContextCacheTest : public BlockStatusServiceTest {
 protected:
  explicit ContextCacheTest(policy::CoherenceMode coherence = policy::CoherenceMode::Exclusive)
      : BlockStatusServiceTest(false, {kBase, kDepth, kBitmap, "example:opaque"}, coherence) {
    select({kBitmap});
  }
  // Upstream's reply to fetch `i`: every context it negotiated, in its own
  // order. The bitmap is dirty over [1 MiB, 1 MiB + 64 KiB) (its state
  // changes there: a 64 KiB granule at most) unless the test says otherwise.
  void answer_window(size_t i, std::vector<Descriptor> bitmap = {}) {
    const uint64_t length = fake.calls.at(i)->length;
    if (bitmap.empty()) bitmap = {{kMiB, 0}, {64 * kKiB, kDirty}, {length - kMiB - 64 * kKiB, 0}};
    fake.answer_contexts(i, {kBase, kDepth, kBitmap, "example:opaque"},
                         {{{length, 0}}, {{2 * kMiB, 1}, {length - 2 * kMiB, 2}}, bitmap, {{length, 7}}});
    settle();
  }
  // A REQ_ONE hit on context `name` alone: its one descriptor, nullopt on a miss.
  std::optional<Descriptor> hit_one(const std::string& name, uint64_t offset, uint64_t length = 4 * kMiB) {
    const auto saved = selected;
    select({name});
    auto chunks = hit_chunks(offset, length, true);
    selected = saved;
    client.selected = selected;
    if (!chunks) return std::nullopt;
    EXPECT_EQ(chunks->size(), 1u);
    EXPECT_EQ(chunks->at(0).context_id, context_id(name));
    EXPECT_EQ(chunks->at(0).descriptors.size(), 1u);
    return chunks->at(0).descriptors.at(0);
  }
  void write(uint64_t offset, uint64_t length, bool succeeded = true) {
    auto ticket = service->begin_mutation(offset, length);
    service->end_mutation(ticket, offset, length, policy::Mutation::Write, succeeded);
  }
  ContextCounters& counters(const std::string& name) { return metrics.contexts[name]; }
};

TEST_F(ContextCacheTest, ABitmapWalkFetchesAWindowWithoutReqOneAndThenHits) {
  EXPECT_FALSE(hit_chunks(0, 4096, true));
  auto first = ask_after_miss(0, 4096, true);
  ASSERT_EQ(fake.calls.size(), 1u);
  EXPECT_EQ(fake.calls[0]->length, 16 * kMiB);
  EXPECT_FALSE(fake.calls[0]->flags.req_one);
  answer_window(0);
  ASSERT_TRUE(first->done);
  EXPECT_EQ(first->chunks, (std::vector<Chunk>{{true, context_id(kBitmap), {{4096, 0}}}}));
  // qemu's REQ_ONE walk: one extent each, as long as upstream would make it.
  EXPECT_EQ(hit_one(kBitmap, 4096), (Descriptor{kMiB - 4096, 0}));
  EXPECT_EQ(hit_one(kBitmap, kMiB), (Descriptor{64 * kKiB, kDirty}));
  EXPECT_EQ(hit_one(kBitmap, kMiB + 64 * kKiB), (Descriptor{4 * kMiB, 0})) << "clipped to the request";
  EXPECT_EQ(fake.calls.size(), 1u);
  EXPECT_EQ(counters(kBitmap).hits, 3u);
  EXPECT_EQ(counters(kBitmap).misses, 1u);
  EXPECT_EQ(counters(kBitmap).upstream_calls, 1u);
  EXPECT_FALSE(hit_one(kBase, 0)) << "nobody asked about base:allocation: its part of the reply is not kept";
  EXPECT_FALSE(hit_one(kDepth, 0));
  EXPECT_EQ(counters(kBase).upstream_calls, 0u);
}

TEST_F(ContextCacheTest, OneUpstreamCallFillsEveryContextAClientAskedAbout) {
  select({kDepth, kBitmap});
  auto first = ask_after_miss(0, 3 * kMiB, false);
  ASSERT_EQ(fake.calls.size(), 1u);
  answer_window(0);
  ASSERT_TRUE(first->done);
  EXPECT_EQ(
      first->chunks,
      (std::vector<Chunk>{{false, context_id(kDepth), {{2 * kMiB, 1}, {kMiB, 2}}},
                          {true, context_id(kBitmap), {{kMiB, 0}, {64 * kKiB, kDirty}, {2 * kMiB - 64 * kKiB, 0}}}}))
      << "each context in the client's order, the last one done";
  EXPECT_EQ(hit_one(kDepth, kMiB), (Descriptor{kMiB, 1}));
  EXPECT_EQ(hit_one(kDepth, 2 * kMiB), (Descriptor{4 * kMiB, 2}));
  EXPECT_EQ(hit_one(kBitmap, kMiB), (Descriptor{64 * kKiB, kDirty}));
  // The next window: a client asking about the depth alone fills the bitmap's too.
  select({kDepth});
  auto next = ask_after_miss(20 * kMiB, 4096, true);
  ASSERT_EQ(fake.calls.size(), 2u);
  answer_window(1);
  ASSERT_TRUE(next->done);
  EXPECT_EQ(hit_one(kBitmap, 20 * kMiB), (Descriptor{kMiB, 0}));
  EXPECT_EQ(fake.calls.size(), 2u);
  EXPECT_EQ(counters(kDepth).upstream_calls, 2u);
  EXPECT_EQ(counters(kBitmap).upstream_calls, 2u) << "the second call filled the bitmap's window too";
}

TEST_F(ContextCacheTest, AWriteForgetsDepthAndBitmapWhereBaseAllocationKeepsData) {
  select({kBase, kDepth, kBitmap});
  auto first = ask_after_miss(0, 4096, true);
  answer_window(0);
  ASSERT_TRUE(first->done);
  write(4 * kMiB + 4096, 4096);
  EXPECT_EQ(hit_one(kBase, 4 * kMiB + 4096, 4096), (Descriptor{4096, 0})) << "data: always safe";
  EXPECT_FALSE(hit_one(kDepth, 4 * kMiB)) << "the depth may have changed: no value is safe";
  EXPECT_FALSE(hit_one(kBitmap, 4 * kMiB)) << "the write may have dirtied it: never answer clean";
  EXPECT_FALSE(hit_one(kBitmap, 4 * kMiB + 60 * kKiB)) << "the whole granule";
  EXPECT_EQ(hit_one(kDepth, 4 * kMiB + 64 * kKiB), (Descriptor{4 * kMiB, 2})) << "beyond the allocation unit: kept";
  EXPECT_EQ(hit_one(kBitmap, 4 * kMiB + 64 * kKiB), (Descriptor{4 * kMiB, 0}));
  // Asked again: a window fetched now describes upstream after the write.
  select({kBitmap});
  auto again = ask_after_miss(4 * kMiB, 4096, true);
  ASSERT_EQ(fake.calls.size(), 2u);
  EXPECT_EQ(fake.calls[1]->offset, 4 * kMiB);
  answer_window(1, {{64 * kKiB, kDirty}, {fake.calls[1]->length - 64 * kKiB, 0}});
  ASSERT_TRUE(again->done);
  EXPECT_EQ(again->chunks, (std::vector<Chunk>{{true, context_id(kBitmap), {{4096, kDirty}}}}));
}

TEST_F(ContextCacheTest, AFailedWriteForgetsToo) {
  auto first = ask_after_miss(0, 4096, true);
  answer_window(0);
  ASSERT_TRUE(first->done);
  write(4 * kMiB, 4096, false);
  EXPECT_FALSE(hit_one(kBitmap, 4 * kMiB));
}

TEST_F(ContextCacheTest, ABitmapIsForgottenAroundAWriteByTheGranuleItsRepliesAllow) {
  select({kDepth, kBitmap});
  auto first = ask_after_miss(0, 4096, true);
  // The bitmap changes state at 2 MiB and 2 MiB + 256 KiB: its granule is at most 256 KiB.
  answer_window(0, {{2 * kMiB, 0}, {256 * kKiB, kDirty}, {14 * kMiB - 256 * kKiB, 0}});
  ASSERT_TRUE(first->done);
  write(4 * kMiB + 4096, 4096);
  EXPECT_EQ(hit_one(kDepth, 4 * kMiB + 128 * kKiB), (Descriptor{4 * kMiB, 2})) << "the depth: the allocation unit";
  EXPECT_FALSE(hit_one(kBitmap, 4 * kMiB + 128 * kKiB)) << "inside the bitmap's possible granule";
  EXPECT_EQ(hit_one(kBitmap, 4 * kMiB + 256 * kKiB), (Descriptor{4 * kMiB, 0}));
}

TEST_F(ContextCacheTest, BeforeItsRepliesTellItsGranuleABitmapIsForgottenBy2GiBAroundAWrite) {
  select({kDepth, kBitmap});
  auto first = ask_after_miss(0, 4096, true);
  answer_window(0, {{16 * kMiB, 0}});  // all clean: no boundary, nothing known of the granule
  ASSERT_TRUE(first->done);
  write(4 * kMiB, 4096);
  EXPECT_FALSE(hit_one(kBitmap, 12 * kMiB));
  EXPECT_FALSE(hit_one(kBitmap, 0));
  EXPECT_EQ(hit_one(kDepth, 12 * kMiB), (Descriptor{4 * kMiB, 2}));
}

TEST_F(ContextCacheTest, AFetchRacingAWriteNeverLetsItsCleanBitmapBackIn) {
  select({kDepth, kBitmap});
  auto query = ask_after_miss(0, 4096, true);
  ASSERT_EQ(fake.calls.size(), 1u);
  write(4 * kMiB, 4096);  // begins and completes upstream while the fetch is out
  answer_window(0);       // computed before the write: clean there, and the old depth
  ASSERT_TRUE(query->done);
  EXPECT_FALSE(hit_one(kBitmap, 4 * kMiB));
  EXPECT_FALSE(hit_one(kDepth, 4 * kMiB));
  EXPECT_EQ(hit_one(kBitmap, 0), (Descriptor{kMiB, 0})) << "far from the write: kept";
}

TEST_F(ContextCacheTest, AQueryAtAWriteRacingItsFetchIsAskedAgainForEveryContext) {
  select({kDepth, kBitmap});
  auto ticket = service->begin_mutation(4 * kMiB, 4096);
  auto query = ask_after_miss(4 * kMiB, 4096, true);
  ASSERT_EQ(fake.calls.size(), 1u);
  answer_window(0);
  ASSERT_EQ(fake.calls.size(), 2u) << "the window's reply cannot answer inside the write";
  EXPECT_EQ(fake.calls[1]->offset, 4 * kMiB);
  EXPECT_EQ(fake.calls[1]->length, 4096u);
  EXPECT_TRUE(fake.calls[1]->flags.req_one);
  fake.answer_contexts(1, {kBase, kDepth, kBitmap}, {{{4096, 0}}, {{4096, 1}}, {{4096, kDirty}}});
  settle();
  ASSERT_TRUE(query->done);
  EXPECT_EQ(query->chunks, (std::vector<Chunk>{{false, context_id(kDepth), {{4096, 1}}},
                                               {true, context_id(kBitmap), {{4096, kDirty}}}}));
  service->end_mutation(ticket, 4 * kMiB, 4096, policy::Mutation::Write, true);
}

TEST_F(ContextCacheTest, AQueryNamingAContextBscacheDoesNotKnowIsPassedThroughWhole) {
  select({kBitmap, "example:opaque"});
  auto query = ask_after_miss(0, 4096, true);
  ASSERT_EQ(fake.calls.size(), 1u);
  EXPECT_EQ(fake.calls[0]->length, 4096u) << "as the client asked";
  EXPECT_TRUE(fake.calls[0]->flags.req_one);
  fake.answer_contexts(0, {kBitmap, "example:opaque"}, {{{4096, kDirty}}, {{4096, 7}}});
  settle();
  ASSERT_TRUE(query->done);
  EXPECT_EQ(query->chunks, (std::vector<Chunk>{{false, context_id(kBitmap), {{4096, kDirty}}},
                                               {true, context_id("example:opaque"), {{4096, 7}}}}));
  EXPECT_FALSE(hit_one(kBitmap, 0)) << "nothing was kept";
}

class ContextCacheOffTest : public ContextCacheTest {
 protected:
  ContextCacheOffTest() : ContextCacheTest(policy::CoherenceMode::Off) {}
};

TEST_F(ContextCacheOffTest, EveryQueryIsAskedAsItCame) {
  auto query = ask_after_miss(0, 4096, true);
  ASSERT_EQ(fake.calls.size(), 1u);
  EXPECT_EQ(fake.calls[0]->length, 4096u);
  EXPECT_TRUE(fake.calls[0]->flags.req_one);
  fake.answer_contexts(0, {kBitmap}, {{{4096, 0}}});
  settle();
  ASSERT_TRUE(query->done);
  EXPECT_FALSE(hit_one(kBitmap, 0));
}

}  // namespace
}  // namespace bscache::proxy
