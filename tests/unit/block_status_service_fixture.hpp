// The test fixture of BlockStatusService: a stand-in upstream that answers
// when the test says so, a client's queries (hits, and misses left running),
// and the reply's chunks decoded as a client reads them.
#pragma once

#include <gtest/gtest.h>

#include <boost/asio/redirect_error.hpp>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "proxy/exports/block_status_service.hpp"

#include "test_units.hpp"

namespace bscache::proxy::testing_fixture {

using wire::Descriptor;
constexpr uint64_t kMiB = uint64_t{1} << 20;
using bscache::test::kHoleZero;

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
    answer_contexts(i, {"base:allocation"}, {std::move(extents)});
  }
  // Upstream's answer for each of `contexts` (the contexts its connection negotiated).
  void answer_contexts(size_t i, std::vector<std::string> contexts, std::vector<std::vector<Descriptor>> extents) {
    CommandResult result;
    result.extents = std::move(extents);
    result.contexts = std::make_shared<const std::vector<std::string>>(std::move(contexts));
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

// One block-status chunk of a reply, as the client reads it.
struct Chunk {
  bool done = false;
  uint32_t context_id = 0;
  std::vector<Descriptor> descriptors;
  bool operator==(const Chunk&) const = default;
};

// Either form: BLOCK_STATUS chunks under structured headers, or
// BLOCK_STATUS_EXT chunks under extended headers (which echo the request's
// offset, `offset`).
inline std::vector<Chunk> decode_chunks(wire::ByteSpan reply, uint64_t cookie, uint64_t offset = 0) {
  std::vector<Chunk> chunks;
  wire::ByteReader in(reply);
  while (in.remaining() > 0) {
    const uint32_t magic = in.u32().value_or(0);
    const bool extended = magic == wire::kExtendedReplyMagic;
    if (!extended) {
      EXPECT_EQ(magic, wire::kStructuredReplyMagic);
    }
    const uint16_t flags = in.u16().value_or(0);
    const uint16_t type = in.u16().value_or(0);
    EXPECT_EQ(in.u64().value_or(0), cookie);
    if (extended) {
      EXPECT_EQ(in.u64().value_or(~offset), offset);
    }
    const uint64_t length = extended ? in.u64().value_or(0) : in.u32().value_or(0);
    const uint32_t context_id = in.u32().value_or(0);
    const uint32_t count = extended ? in.u32().value_or(0) : 0;
    EXPECT_EQ(type, extended ? wire::kReplyTypeBlockStatusExt : wire::kReplyTypeBlockStatus);
    if (context_id == 0 || length < (extended ? 8u : 4u)) {
      ADD_FAILURE() << "truncated chunk";
      break;
    }
    Chunk chunk{.done = (flags & wire::kReplyFlagDone) != 0, .context_id = context_id, .descriptors = {}};
    const uint64_t n = extended ? (length - 8) / 16 : (length - 4) / 8;
    if (extended) {
      EXPECT_EQ(count, n);
    }
    for (uint64_t i = 0; i < n && in.remaining() > 0; ++i) {
      const uint64_t extent = extended ? in.u64().value_or(0) : in.u32().value_or(0);
      const uint64_t state = extended ? in.u64().value_or(0) : in.u32().value_or(0);
      chunk.descriptors.push_back({extent, static_cast<uint32_t>(state)});
    }
    chunks.push_back(std::move(chunk));
  }
  return chunks;
}

inline wire::RequestHeader block_status_request(uint64_t offset, uint64_t length, bool req_one) {
  static uint64_t cookie = 0;
  return {.flags = req_one ? wire::kCmdFlagReqOne : uint16_t{0},
          .type = wire::kCmdBlockStatus,
          .cookie = ++cookie,
          .offset = offset,
          .length = length};
}

class BlockStatusServiceTest : public ::testing::Test {
 protected:
  explicit BlockStatusServiceTest(bool prefetch = false,
                                  std::vector<std::string> upstream_contexts = {"base:allocation"},
                                  policy::CoherenceMode coherence = policy::CoherenceMode::Exclusive,
                                  uint64_t size = 64 * kMiB, uint64_t max_window = 16 * kMiB) {
    UpstreamInfo upstream;
    upstream.size = size;
    upstream.contexts = std::move(upstream_contexts);
    info = make_export_info(upstream, false);
    BlockStatusConfig config;
    config.coherence.mode = coherence;
    config.prefetch.enabled = prefetch;
    config.max_window = max_window;
    config.limits.allocation_granularity = uint64_t{64} * 1024;
    service = std::make_unique<BlockStatusService>(io, fake, info, config, metrics);
    select({"base:allocation"});
  }

  // The contexts the client selects, by name, in this order.
  void select(const std::vector<std::string>& names) {
    selected.clear();
    for (const auto& name : names) {
      const auto ids = match_contexts(info, name, false);
      ASSERT_EQ(ids.size(), 1u) << name;
      selected.push_back(ids[0]);
    }
    client = {.offered = &info, .selected = selected, .align = 1};
  }
  uint32_t context_id(const std::string& name) { return match_contexts(info, name, false).at(0) + 1; }

  // A client's query after a miss, left running until the test answers upstream.
  struct Pending {
    bool done = false;
    int error = -1;
    std::string_view message;
    std::vector<Chunk> chunks;
    std::vector<Descriptor> answer;  // the base:allocation chunk's, when that is the one context
  };
  std::shared_ptr<Pending> ask_after_miss(uint64_t offset, uint64_t length, bool req_one) {
    auto pending = std::make_shared<Pending>();
    asio::co_spawn(
        io,
        [this, pending, request = block_status_request(offset, length, req_one)]() -> awaitable<void> {
          auto reply = co_await service->answer(client, request);
          pending->error = reply.error;
          pending->message = reply.message;
          pending->chunks = decode_chunks(reply.chunks, request.cookie, request.offset);
          if (pending->chunks.size() == 1) pending->answer = pending->chunks[0].descriptors;
          pending->done = true;
        },
        asio::detached);
    settle();
    return pending;
  }
  void settle() {
    io.restart();
    io.poll();
  }
  std::optional<std::vector<Descriptor>> hit(uint64_t offset, uint64_t length, bool req_one) {
    const auto request = block_status_request(offset, length, req_one);
    wire::Bytes reply;
    if (!service->try_answer(client, request, reply)) return std::nullopt;
    const auto chunks = decode_chunks(reply, request.cookie, request.offset);
    EXPECT_EQ(chunks.size(), 1u);
    if (chunks.size() != 1) return std::nullopt;
    EXPECT_TRUE(chunks[0].done);
    EXPECT_EQ(chunks[0].context_id, static_cast<uint32_t>(info.base_allocation) + 1);
    return chunks[0].descriptors;
  }

  // A hit's whole reply, every context's chunk; nullopt on a miss.
  std::optional<std::vector<Chunk>> hit_chunks(uint64_t offset, uint64_t length, bool req_one) {
    const auto request = block_status_request(offset, length, req_one);
    wire::Bytes reply;
    if (!service->try_answer(client, request, reply)) return std::nullopt;
    return decode_chunks(reply, request.cookie, request.offset);
  }

  asio::io_context io;
  ScriptedUpstream fake{io};
  ExportInfo info;
  Metrics metrics;
  std::unique_ptr<BlockStatusService> service;
  std::vector<uint32_t> selected;
  BlockStatusClient client;
};

}  // namespace bscache::proxy::testing_fixture
