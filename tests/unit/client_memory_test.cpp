// ClientMemory's rules (who may take more, who is woken when) and the
// footprints the sessions charge, in the words of the README's "Memory".
#include <gtest/gtest.h>

#include <utility>

#include "proxy/buffer_pool.hpp"
#include "proxy/client_memory.hpp"

namespace bscache::proxy {
namespace {

constexpr size_t MiB = size_t{1} << 20;
using Verdict = ClientMemory::Verdict;

TEST(ClientMemory, ARequestIsTakenOnlyIfTheTotalHoldsIt) {
  ClientMemory memory(64 * MiB);
  EXPECT_EQ(memory.admit(0, 64 * MiB), Verdict::Go) << "exactly the limit";
  memory.charge(60 * MiB);
  EXPECT_EQ(memory.admit(0, 4 * MiB), Verdict::Go);
  EXPECT_EQ(memory.admit(0, 4 * MiB + 1), Verdict::Full) << "past the limit, even holding nothing queued";
  memory.release(60 * MiB);
  EXPECT_EQ(memory.held(), 0u);
}

TEST(ClientMemory, BeyondHalfAClientWithUnreadRepliesStops) {
  ClientMemory memory(64 * MiB);
  memory.charge(31 * MiB);
  EXPECT_EQ(memory.admit(1, MiB), Verdict::Go) << "at half: everyone goes on";
  EXPECT_EQ(memory.admit(1, MiB + 1), Verdict::Pressure) << "past half, with replies queued";
  EXPECT_EQ(memory.admit(0, 16 * MiB), Verdict::Go) << "a client that reads its replies goes on";
  memory.charge(32 * MiB);
  EXPECT_EQ(memory.admit(5 * MiB, 2 * MiB), Verdict::Pressure) << "queued replies: pressure, not room, is why";
  memory.release(63 * MiB);
}

class Waiting : public ::testing::Test {
 protected:
  // A timer like a session's wake-up timer, waited on; true once cancelled.
  struct Sleeper {
    explicit Sleeper(asio::io_context& io) : timer(io), waiter(timer) {
      timer.expires_at(asio::steady_timer::time_point::max());
      timer.async_wait([this](const boost::system::error_code&) { woken = true; });
    }
    asio::steady_timer timer;
    ClientMemory::Waiter waiter;
    bool woken = false;
  };
  void run() {
    io.poll();
    io.restart();
  }
  asio::io_context io;
  ClientMemory memory{64 * MiB};
};

TEST_F(Waiting, AWaiterOfRoomIsWokenByAnyRelease) {
  memory.charge(64 * MiB);
  Sleeper s(io);
  memory.wait(s.waiter, Verdict::Full);
  EXPECT_EQ(memory.paused(), 1u);
  run();
  EXPECT_FALSE(s.woken);
  memory.release(4096);
  run();
  EXPECT_TRUE(s.woken);
  EXPECT_EQ(memory.paused(), 0u) << "woken once: it registers again if it still cannot go on";
  memory.release(64 * MiB - 4096);
}

TEST_F(Waiting, AWaiterOfThePressureRuleIsWokenOnlyUnderHalf) {
  memory.charge(40 * MiB);
  Sleeper s(io);
  memory.wait(s.waiter, Verdict::Pressure);
  memory.release(4 * MiB);  // 36 MiB: still over half
  run();
  EXPECT_FALSE(s.woken) << "only its own replies leaving can let it go on meanwhile";
  memory.release(4 * MiB);  // 32 MiB: half
  run();
  EXPECT_TRUE(s.woken);
  memory.release(32 * MiB);
}

TEST_F(Waiting, AWaiterThatGoesAwayLeavesTheList) {
  memory.charge(64 * MiB);
  {
    Sleeper s(io);
    memory.wait(s.waiter, Verdict::Full);
    memory.wait(s.waiter, Verdict::Full);  // registering twice is once
    EXPECT_EQ(memory.paused(), 1u);
    s.timer.cancel();
    run();
  }
  EXPECT_EQ(memory.paused(), 0u) << "a session destroyed while waiting unlinks itself";
  memory.release(64 * MiB);  // must not touch it
}

TEST(ClientMemory, PeakSinceTheLastLook) {
  ClientMemory memory(64 * MiB);
  memory.charge(10 * MiB);
  memory.release(8 * MiB);
  EXPECT_EQ(memory.peak(), 10 * MiB);
  EXPECT_EQ(memory.take_peak(), 10 * MiB);
  EXPECT_EQ(memory.peak(), 2 * MiB) << "from what is held now";
  memory.release(2 * MiB);
}

TEST(Footprint, WhatTheAllocatorTakes) {
  EXPECT_EQ(heap_block(0), 0u);
  EXPECT_EQ(heap_block(1), 32u) << "glibc's smallest chunk";
  EXPECT_EQ(heap_block(16), 32u);
  EXPECT_EQ(heap_block(24), 32u);
  EXPECT_EQ(heap_block(25), 48u);
  EXPECT_EQ(PooledBuffer::footprint(1), 4096u) << "a 1-byte READ takes a 4 KiB buffer";
  EXPECT_EQ(PooledBuffer::footprint(4097), 8192u);
  EXPECT_EQ(PooledBuffer::footprint(32 * MiB), 32 * MiB);
  BufferPool pool;
  auto buffer = pool.acquire(1);
  EXPECT_EQ(buffer.size(), 1u);
  EXPECT_EQ(buffer.capacity(), 4096u);
  EXPECT_EQ(PooledBuffer{}.capacity(), 0u);
}

TEST(BufferPoolShrink, FreesIdleBuffersDownToWhatIsKept) {
  BufferPool pool;
  {
    std::vector<PooledBuffer> held;
    for (int i = 0; i < 64; ++i) held.push_back(pool.acquire(4096));
    held.push_back(pool.acquire(MiB));
  }
  EXPECT_EQ(pool.idle_bytes(), 64 * 4096 + MiB);
  EXPECT_EQ(pool.acquisitions(), 65u);
  pool.shrink(MiB);
  EXPECT_EQ(pool.idle_bytes(), MiB) << "the small ones go first";
  pool.shrink(0);
  EXPECT_EQ(pool.idle_bytes(), 0u);
  auto again = pool.acquire(MiB);
  EXPECT_EQ(pool.allocations(), 66u) << "a fresh allocation after the shrink";
}

}  // namespace
}  // namespace bscache::proxy
