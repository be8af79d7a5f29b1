// BlockStatusService against a stand-in upstream that answers when the test
// says so: misses become one window fetch however many clients wait, hits need
// no upstream, prefetch runs ahead of a scan, and a write racing a fetch never
// lets the fetch's old answer back into the cache. Contexts whose meaning
// bscache does not know are passed through, one upstream call per query, with
// the client's context ids; base:allocation that upstream lacks is all data.
// (The cached qemu: contexts: meta_context_cache_test.cpp.)
#include "block_status_service_fixture.hpp"

namespace bscache::proxy {
namespace {

using namespace testing_fixture;

TEST_F(BlockStatusServiceTest, AMissFetchesOneWindowWithoutReqOneAndLaterQueriesHit) {
  EXPECT_FALSE(hit(0, 4096, true));
  auto first = ask_after_miss(0, 4096, true);
  ASSERT_EQ(fake.calls.size(), 1u);
  EXPECT_EQ(fake.calls[0]->offset, 0u);
  EXPECT_EQ(fake.calls[0]->length, 16 * kMiB);
  EXPECT_FALSE(fake.calls[0]->flags.req_one);
  fake.answer(0, {{kMiB, 0}, {kMiB, kHoleZero}, {14 * kMiB, 0}});
  settle();
  ASSERT_TRUE(first->done);
  EXPECT_EQ(first->error, 0);
  EXPECT_EQ(first->answer, (std::vector<Descriptor>{{4096, 0}}));  // REQ_ONE: clipped to the request
  EXPECT_EQ(hit(kMiB, 2 * kMiB, true), (std::vector<Descriptor>{{kMiB, kHoleZero}}));
  EXPECT_EQ(hit(0, 3 * kMiB, false), (std::vector<Descriptor>{{kMiB, 0}, {kMiB, kHoleZero}, {kMiB, 0}}));
  EXPECT_EQ(fake.calls.size(), 1u);
}

// An extended-headers client's queries are 64-bit; upstream's are not.
class LongQueryTest : public BlockStatusServiceTest {
 protected:
  LongQueryTest()
      : BlockStatusServiceTest(false, {"base:allocation"}, policy::CoherenceMode::Exclusive, kGiB * 64,
                               policy::kMaxRequestLength) {
    client.extended_headers = true;
  }
  static constexpr uint64_t kGiB = uint64_t{1} << 30;
};

TEST_F(LongQueryTest, AMissLongerThanUpstreamTakesIsAnsweredForOneWindow) {
  auto first = ask_after_miss(0, 16 * kGiB, false);
  ASSERT_EQ(fake.calls.size(), 1u);
  const uint64_t window = fake.calls[0]->length;
  EXPECT_LE(window, policy::kMaxRequestLength) << "one window, within upstream's 32 bits";
  EXPECT_GT(window, 4 * kGiB - kMiB);
  fake.answer(0, {{window, kHoleZero}});
  settle();
  ASSERT_TRUE(first->done);
  EXPECT_EQ(first->answer, (std::vector<Descriptor>{{window, kHoleZero}})) << "less than asked";
  auto second = ask_after_miss(window, 16 * kGiB, false);
  settle();
  ASSERT_EQ(fake.calls.size(), 2u);
  EXPECT_EQ(fake.calls[1]->offset, window);
  fake.answer(1, {{fake.calls[1]->length, kHoleZero}});
  settle();
  ASSERT_TRUE(second->done);
  // Both windows, joined: one REQ_ONE descriptor longer than 4 GiB, within what was asked.
  EXPECT_EQ(hit(0, 16 * kGiB, true), (std::vector<Descriptor>{{window + fake.calls[1]->length, kHoleZero}}));
  EXPECT_EQ(hit(0, 5 * kGiB, true), (std::vector<Descriptor>{{5 * kGiB, kHoleZero}}));
  EXPECT_EQ(fake.calls.size(), 2u);
}

TEST_F(BlockStatusServiceTest, ClientsMissingInOneWindowShareOneFetch) {
  auto a = ask_after_miss(0, 4096, true);
  auto b = ask_after_miss(8 * kMiB, 4096, true);
  auto c = ask_after_miss(20 * kMiB, 4096, true);  // another window
  ASSERT_EQ(fake.calls.size(), 2u);
  fake.answer(0, {{16 * kMiB, kHoleZero}});
  settle();
  EXPECT_TRUE(a->done);
  EXPECT_TRUE(b->done);
  EXPECT_EQ(b->answer, (std::vector<Descriptor>{{4096, kHoleZero}}));
  EXPECT_FALSE(c->done);
  fake.answer(1, {{16 * kMiB, 0}});
  settle();
  EXPECT_TRUE(c->done);
  EXPECT_EQ(c->answer, (std::vector<Descriptor>{{4096, 0}}));
}

TEST_F(BlockStatusServiceTest, AWriteThatCompletesWhileAFetchIsOutKeepsTheFetchsOldAnswerOut) {
  auto query = ask_after_miss(0, 4096, true);
  ASSERT_EQ(fake.calls.size(), 1u);
  // The write starts and completes upstream while the fetch is out...
  auto ticket = service->begin_mutation(4 * kMiB, 4096);
  service->end_mutation(ticket, 4 * kMiB, 4096, policy::Mutation::Write, true);
  // ...and the fetch's reply, computed before the write, says hole and zero there.
  fake.answer(0, {{16 * kMiB, kHoleZero}});
  settle();
  ASSERT_TRUE(query->done);
  auto written = hit(4 * kMiB, 4096, true);
  ASSERT_TRUE(written);
  EXPECT_EQ(written->front().flags, 0u) << "a written range must never read back as a hole";
  EXPECT_EQ(hit(0, 4096, true), (std::vector<Descriptor>{{4096, kHoleZero}}));  // far from the write: kept
}

TEST_F(BlockStatusServiceTest, AWriteInFlightWhenTheFetchReturnsLeavesItsRangeUnknown) {
  auto ticket = service->begin_mutation(kMiB, 4096);
  auto query = ask_after_miss(0, 4096, true);
  fake.answer(0, {{16 * kMiB, kHoleZero}});
  settle();
  ASSERT_TRUE(query->done);
  EXPECT_FALSE(hit(kMiB, 4096, true)) << "nothing may be claimed while the write is in flight";
  service->end_mutation(ticket, kMiB, 4096, policy::Mutation::Write, false);  // and it failed
  EXPECT_FALSE(hit(kMiB, 4096, true));
}

TEST_F(BlockStatusServiceTest, AFailedWindowFallsBackToAskingForTheRequestExactly) {
  auto query = ask_after_miss(kMiB, 8192, true);
  ASSERT_EQ(fake.calls.size(), 1u);
  fake.fail(0, EINVAL);  // e.g. an upstream that refuses long windows
  settle();
  ASSERT_EQ(fake.calls.size(), 2u);
  EXPECT_EQ(fake.calls[1]->offset, kMiB);
  EXPECT_EQ(fake.calls[1]->length, 8192u);
  EXPECT_TRUE(fake.calls[1]->flags.req_one);
  fake.answer(1, {{65536, 0}});
  settle();
  ASSERT_TRUE(query->done);
  EXPECT_EQ(query->error, 0);
  EXPECT_EQ(query->answer, (std::vector<Descriptor>{{8192, 0}}));
}

TEST_F(BlockStatusServiceTest, AnUpstreamErrorReachesTheClient) {
  auto query = ask_after_miss(0, 4096, false);
  fake.fail(0, EINVAL);
  settle();
  fake.fail(1, EIO);
  settle();
  ASSERT_TRUE(query->done);
  EXPECT_EQ(query->error, EIO);
}

class PrefetchingServiceTest : public BlockStatusServiceTest {
 protected:
  PrefetchingServiceTest() : BlockStatusServiceTest(true) {}
};

TEST_F(PrefetchingServiceTest, AScanThroughAWindowFetchesTheNextOneAhead) {
  auto query = ask_after_miss(0, 4096, true);
  fake.answer(0, {{16 * kMiB, kHoleZero}});
  settle();
  ASSERT_TRUE(query->done);
  EXPECT_EQ(fake.calls.size(), 1u) << "a look-up at a window's start is not yet a scan";
  metrics.client_requests[wire::kCmdBlockStatus] = 10;  // the scan so far saved calls: a prefetch is affordable
  ASSERT_TRUE(hit(8 * kMiB, 4096, true));               // halfway in: a scan
  settle();                                             // the prefetch runs as its own task
  ASSERT_GE(fake.calls.size(), 2u);
  EXPECT_EQ(fake.calls[1]->offset, 16 * kMiB);
  EXPECT_EQ(metrics.prefetches_issued, fake.calls.size() - 1);
}

// An upstream with base:allocation and a context bscache does not know, and a client that selects both.
class PassthroughTest : public BlockStatusServiceTest {
 protected:
  static constexpr uint32_t kDirty = 1;
  PassthroughTest() : BlockStatusServiceTest(false, {"base:allocation", "example:opaque"}) {
    select({"example:opaque", "base:allocation"});
  }
};

TEST_F(PassthroughTest, EveryQueryAsksUpstreamOnceAndAnswersEachContextUnderTheClientsId) {
  EXPECT_FALSE(hit(0, 8192, false)) << "a context bscache does not know is never cached";
  auto query = ask_after_miss(0, 8192, false);
  ASSERT_EQ(fake.calls.size(), 1u);
  EXPECT_EQ(fake.calls[0]->offset, 0u);
  EXPECT_EQ(fake.calls[0]->length, 8192u);
  EXPECT_FALSE(fake.calls[0]->flags.req_one);
  // Upstream's connection lists its contexts in its own order.
  fake.answer_contexts(0, {"base:allocation", "example:opaque"}, {{{4096, 0}, {65536, kHoleZero}}, {{8192, kDirty}}});
  settle();
  ASSERT_TRUE(query->done);
  EXPECT_EQ(query->error, 0);
  EXPECT_EQ(query->chunks, (std::vector<Chunk>{{false, context_id("example:opaque"), {{8192, kDirty}}},
                                               {true, context_id("base:allocation"), {{4096, 0}, {4096, kHoleZero}}}}))
      << "in the client's order, cut to its range, the last one done";
  auto again = ask_after_miss(0, 8192, false);
  EXPECT_EQ(fake.calls.size(), 2u) << "nothing was kept";
}

TEST_F(PassthroughTest, ReqOneAsksUpstreamWithReqOneAndSendsOneDescriptorPerContext) {
  auto query = ask_after_miss(4096, 8192, true);
  ASSERT_EQ(fake.calls.size(), 1u);
  EXPECT_TRUE(fake.calls[0]->flags.req_one);
  fake.answer_contexts(0, {"base:allocation", "example:opaque"},
                       {{{65536, kHoleZero}, {4096, 0}}, {{4096, kDirty}, {4096, 0}}});
  settle();
  ASSERT_TRUE(query->done);
  EXPECT_EQ(query->chunks, (std::vector<Chunk>{{false, context_id("example:opaque"), {{4096, kDirty}}},
                                               {true, context_id("base:allocation"), {{8192, kHoleZero}}}}));
}

TEST_F(PassthroughTest, AContextUpstreamLeftOutFailsTheQueryWithEio) {
  auto query = ask_after_miss(0, 4096, false);
  fake.answer_contexts(0, {"base:allocation"}, {{{4096, 0}}});  // a reconnect lost the bitmap
  settle();
  ASSERT_TRUE(query->done);
  EXPECT_EQ(query->error, EIO);
  EXPECT_EQ(query->message, "upstream sent no extents for a selected context");
}

TEST_F(PassthroughTest, AnUpstreamErrorReachesTheClient) {
  auto query = ask_after_miss(0, 4096, false);
  fake.fail(0, EINVAL);
  settle();
  ASSERT_TRUE(query->done);
  EXPECT_EQ(query->error, EINVAL);
  EXPECT_EQ(fake.calls.size(), 1u) << "a passed-through query is asked once";
}

TEST_F(PassthroughTest, AnUnalignedQueryIsAskedAsWholeBlocksAndCutBack) {
  client.align = 4096;
  auto query = ask_after_miss(1024, 1024, true);
  ASSERT_EQ(fake.calls.size(), 1u);
  EXPECT_EQ(fake.calls[0]->offset, 0u);
  EXPECT_EQ(fake.calls[0]->length, 4096u);
  EXPECT_FALSE(fake.calls[0]->flags.req_one) << "one extent of the block might end before the query starts";
  fake.answer_contexts(0, {"base:allocation", "example:opaque"}, {{{512, 0}, {3584, kHoleZero}}, {{4096, kDirty}}});
  settle();
  ASSERT_TRUE(query->done);
  EXPECT_EQ(query->chunks, (std::vector<Chunk>{{false, context_id("example:opaque"), {{1024, kDirty}}},
                                               {true, context_id("base:allocation"), {{1024, kHoleZero}}}}));
}

// An extended-headers client's payload filter: only the contexts it names are
// answered, in BLOCK_STATUS_EXT chunks; base:allocation alone comes from the cache.
TEST_F(PassthroughTest, AFilterAnswersOnlyTheContextsItNames) {
  client.extended_headers = true;
  const uint32_t dirty = context_id("example:opaque");  // (bit 0 set, like a dirty bitmap's)
  const uint32_t base = context_id("base:allocation");
  EXPECT_EQ(context_mask(client, std::vector<uint32_t>{dirty}), uint64_t{1});
  EXPECT_EQ(context_mask(client, std::vector<uint32_t>{base, dirty}), uint64_t{0}) << "all of them: no filter";
  EXPECT_FALSE(context_mask(client, std::vector<uint32_t>{dirty, dirty})) << "named twice";
  EXPECT_FALSE(context_mask(client, std::vector<uint32_t>{0}));
  EXPECT_FALSE(context_mask(client, std::vector<uint32_t>{99}));

  auto request = block_status_request(0, 8192, false);
  request.context_mask = 1;  // the dirty bitmap alone
  BlockStatusReply reply;
  asio::co_spawn(
      io, [&]() -> awaitable<void> { reply = co_await service->answer(client, request); }, asio::detached);
  settle();
  ASSERT_EQ(fake.calls.size(), 1u);
  fake.answer_contexts(0, {"base:allocation", "example:opaque"}, {{{8192, 0}}, {{8192, kDirty}}});
  settle();
  EXPECT_EQ(decode_chunks(reply.chunks, request.cookie, 0), (std::vector<Chunk>{{true, dirty, {{8192, kDirty}}}}))
      << "the one chunk is the last";

  request = block_status_request(0, 8192, false);
  request.context_mask = 2;  // base:allocation alone: the cache's
  reply = {};
  asio::co_spawn(
      io, [&]() -> awaitable<void> { reply = co_await service->answer(client, request); }, asio::detached);
  settle();
  ASSERT_EQ(fake.calls.size(), 2u);
  EXPECT_EQ(fake.calls[1]->length, 16 * kMiB) << "a window fetch, not a pass-through";
  fake.answer(1, {{16 * kMiB, kHoleZero}});
  settle();
  EXPECT_EQ(decode_chunks(reply.chunks, request.cookie, 0), (std::vector<Chunk>{{true, base, {{8192, kHoleZero}}}}));
  wire::Bytes hit_reply;
  request = block_status_request(4096, 4096, true);
  request.context_mask = 2;
  ASSERT_TRUE(service->try_answer(client, request, hit_reply));
  EXPECT_EQ(decode_chunks(hit_reply, request.cookie, 4096), (std::vector<Chunk>{{true, base, {{4096, kHoleZero}}}}));
}

// An upstream without base:allocation: bscache offers it, and it is all data.
class SynthesizedTest : public BlockStatusServiceTest {
 protected:
  SynthesizedTest() : BlockStatusServiceTest(false, {"qemu:allocation-depth"}) {}
};

TEST_F(SynthesizedTest, BaseAllocationAloneIsAllDataWithoutAskingUpstream) {
  EXPECT_EQ(hit(0, 65536, false), (std::vector<Descriptor>{{65536, 0}}));
  EXPECT_EQ(hit(4096, 512, true), (std::vector<Descriptor>{{512, 0}}));
  EXPECT_TRUE(fake.calls.empty());
  EXPECT_EQ(metrics.block_status_hits, 2u);
}

TEST_F(SynthesizedTest, BesideAContextUpstreamHasItIsAllDataInTheSameReply) {
  select({"base:allocation", "qemu:allocation-depth"});
  EXPECT_FALSE(hit(0, 8192, false));
  auto query = ask_after_miss(0, 8192, false);
  ASSERT_EQ(fake.calls.size(), 1u);
  fake.answer_contexts(0, {"qemu:allocation-depth"}, {{{4096, 1}, {4096, 0}}});
  settle();
  ASSERT_TRUE(query->done);
  EXPECT_EQ(query->chunks, (std::vector<Chunk>{{false, context_id("base:allocation"), {{8192, 0}}},
                                               {true, context_id("qemu:allocation-depth"), {{4096, 1}, {4096, 0}}}}));
}

// --cache-coherence off: base:allocation is asked upstream for every query.
class CoherenceOffTest : public BlockStatusServiceTest {
 protected:
  CoherenceOffTest() : BlockStatusServiceTest(false, {"base:allocation"}, policy::CoherenceMode::Off) {}
};

TEST_F(CoherenceOffTest, EveryQueryIsAskedAsItCameAndNothingIsKept) {
  auto first = ask_after_miss(0, 4096, true);
  ASSERT_EQ(fake.calls.size(), 1u);
  EXPECT_EQ(fake.calls[0]->length, 4096u) << "no window";
  EXPECT_TRUE(fake.calls[0]->flags.req_one);
  fake.answer(0, {{65536, kHoleZero}});
  settle();
  ASSERT_TRUE(first->done);
  EXPECT_EQ(first->answer, (std::vector<Descriptor>{{4096, kHoleZero}}));
  EXPECT_FALSE(hit(0, 4096, true));
}

// The window of a miss is as long as one request the upstream connection can
// send (with the default --fetch-window): 4 GiB - 1 (rounded down to the
// allocation unit) with 32-bit requests, the whole export with extended headers.
TEST(BlockStatusServiceWindow, FollowsTheLongestRequestUpstreamTakes) {
  for (const bool extended : {false, true}) {
    for (const bool client_extended : {false, true}) {  // the client's headers do not matter
      SCOPED_TRACE(extended ? "extended headers" : "32-bit requests");
      SCOPED_TRACE(client_extended ? "client with extended headers" : "compact client");
      asio::io_context io;
      ScriptedUpstream fake{io};
      UpstreamInfo upstream;
      upstream.size = uint64_t{16} << 30;
      upstream.min_block = 512;
      upstream.contexts = {"base:allocation"};
      if (extended) upstream.max_block_status_length = UINT64_MAX;
      const ExportInfo info = make_export_info(upstream, false);
      BlockStatusConfig config;
      config.prefetch.enabled = false;
      Metrics metrics;
      BlockStatusService service(io, fake, info, config, metrics);
      const std::vector<uint32_t> selected{static_cast<uint32_t>(info.base_allocation)};
      const BlockStatusClient client{
          .offered = &info, .selected = selected, .align = 1, .extended_headers = client_extended};
      const auto request = block_status_request(0, 4096, true);
      BlockStatusReply reply;
      reply.error = -1;
      asio::co_spawn(
          io, [&]() -> awaitable<void> { reply = co_await service.answer(client, request); }, asio::detached);
      io.poll();
      ASSERT_EQ(fake.calls.size(), 1u);
      EXPECT_EQ(fake.calls[0]->length, extended ? upstream.size : uint64_t{0xffff0000u});
      fake.answer(0, {{0xffff0000u, kHoleZero}});
      io.restart();
      io.poll();
      EXPECT_EQ(reply.error, 0);
      const auto chunks = decode_chunks(reply.chunks, request.cookie);
      ASSERT_EQ(chunks.size(), 1u);
      EXPECT_EQ(chunks[0].descriptors, (std::vector<Descriptor>{{4096, kHoleZero}}));
    }
  }
}

}  // namespace
}  // namespace bscache::proxy
