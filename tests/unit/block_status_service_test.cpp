// BlockStatusService against a stand-in upstream that answers when the test
// says so: misses become one window fetch however many clients wait, hits need
// no upstream, prefetch runs ahead of a scan, and a write racing a fetch never
// lets the fetch's old answer back into the cache.
#include <gtest/gtest.h>

#include <boost/asio/redirect_error.hpp>

#include <memory>
#include <optional>
#include <vector>

#include "proxy/exports/block_status_service.hpp"

namespace bscache::proxy {
namespace {

using wire::Descriptor;
constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr uint32_t kHoleZero = 3;

// A test double of our own interface: every call waits until answer() or fail().
class ScriptedUpstream final : public BlockStatusUpstream {
 public:
  struct Call {
    explicit Call(asio::io_context& io) : answered(io, asio::steady_timer::time_point::max()) {}
    uint64_t offset = 0, length = 0;
    CommandFlags flags;
    std::optional<CommandResult> result;
    asio::steady_timer answered;
  };

  explicit ScriptedUpstream(asio::io_context& io) : io_(io) {}

  awaitable<CommandResult> block_status(uint64_t offset, uint64_t length, CommandFlags flags) override {
    auto call = std::make_shared<Call>(io_);
    call->offset = offset;
    call->length = length;
    call->flags = flags;
    calls.push_back(call);
    while (!call->result) {
      boost::system::error_code ignored;
      co_await call->answered.async_wait(asio::redirect_error(use_awaitable, ignored));
    }
    co_return *call->result;
  }

  void answer(size_t i, std::vector<Descriptor> extents) {
    CommandResult result;
    result.extents = {std::move(extents)};
    result.contexts = std::make_shared<const std::vector<std::string>>(1, "base:allocation");
    calls.at(i)->result = std::move(result);
    calls.at(i)->answered.cancel();
  }
  void fail(size_t i, int error) {
    calls.at(i)->result = CommandResult::failed(error);
    calls.at(i)->answered.cancel();
  }

  std::vector<std::shared_ptr<Call>> calls;

 private:
  asio::io_context& io_;
};

class BlockStatusServiceTest : public ::testing::Test {
 protected:
  explicit BlockStatusServiceTest(bool prefetch = false, uint64_t size = 64 * kMiB, uint64_t max_window = 16 * kMiB) {
    UpstreamInfo upstream;
    upstream.size = size;
    upstream.contexts = {"base:allocation"};
    upstream.base_allocation_index = 0;
    info = make_export_info(upstream, false);
    BlockStatusConfig config;
    config.prefetch.enabled = prefetch;
    config.max_window = max_window;
    config.limits.allocation_granularity = uint64_t{64} * 1024;
    service = std::make_unique<BlockStatusService>(io, fake, info, config, metrics);
  }

  // A client's query after a miss, left running until the test answers upstream.
  struct Pending {
    bool done = false;
    int error = -1;
    std::vector<Descriptor> answer;
  };
  std::shared_ptr<Pending> ask_after_miss(uint64_t offset, uint64_t length, bool req_one) {
    auto pending = std::make_shared<Pending>();
    asio::co_spawn(
        io,
        [this, pending, offset, length, req_one]() -> awaitable<void> {
          pending->error = co_await service->answer_after_miss(offset, length, req_one, pending->answer);
          pending->done = true;
        },
        asio::detached);
    io.poll();
    return pending;
  }
  void settle() {
    io.restart();
    io.poll();
  }
  std::optional<std::vector<Descriptor>> hit(uint64_t offset, uint64_t length, bool req_one) {
    std::vector<Descriptor> out;
    if (!service->try_answer(offset, length, req_one, out)) return std::nullopt;
    return out;
  }

  asio::io_context io;
  ScriptedUpstream fake{io};
  ExportInfo info;
  Metrics metrics;
  std::unique_ptr<BlockStatusService> service;
};

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
  LongQueryTest() : BlockStatusServiceTest(false, kGiB * 64, policy::kMaxRequestLength) {}
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

}  // namespace
}  // namespace bscache::proxy
