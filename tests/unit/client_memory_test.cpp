// ClientMemory's rules (who may take more, who is woken when) and the
// footprints the sessions charge, in the words of the README's "Memory".
#include <gtest/gtest.h>

#include <utility>

#include "proxy/io/buffer_pool.hpp"
#include "proxy/io/client_memory.hpp"
#include "proxy/io/loop_signal.hpp"

#include "test_units.hpp"

namespace bscache::proxy {
namespace {
using namespace bscache::test;

using Verdict = ClientMemory::Verdict;

class Admission : public ::testing::Test {
 protected:
  asio::io_context io;
  LoopSignal signal{io};
  ClientMemory::Waiter me{signal};
  ClientMemory memory{64 * MiB};
};

TEST_F(Admission, ARequestIsTakenOnlyIfTheTotalHoldsIt) {
  EXPECT_EQ(memory.admit(me, 0, 64 * MiB), Verdict::Go) << "exactly the limit";
  memory.charge(60 * MiB);
  EXPECT_EQ(memory.admit(me, 0, 4 * MiB), Verdict::Go);
  EXPECT_EQ(memory.admit(me, 0, 4 * MiB + 1), Verdict::Full) << "past the limit, even holding nothing queued";
  memory.release(60 * MiB);
  EXPECT_EQ(memory.held(), 0u);
  EXPECT_EQ(memory.admit(me, 0, 100 * MiB), Verdict::Go) << "larger than the limit: taken when nothing is held";
}

TEST_F(Admission, BeyondHalfOnlyAClientHoldingNothingGoesOn) {
  memory.charge(31 * MiB);
  EXPECT_EQ(memory.admit(me, 1, MiB), Verdict::Go) << "at half: everyone goes on";
  EXPECT_EQ(memory.admit(me, 1, MiB + 1), Verdict::Pressure) << "past half, holding something";
  EXPECT_EQ(memory.admit(me, 0, 16 * MiB), Verdict::Go) << "a client holding nothing goes on";
  memory.charge(32 * MiB);
  EXPECT_EQ(memory.admit(me, 5 * MiB, 2 * MiB), Verdict::Pressure) << "holding something: pressure, not room, is why";
  memory.release(63 * MiB);
}

TEST_F(Admission, FirstComeFirstServedForRoom) {
  LoopSignal other_signal{io};
  ClientMemory::Waiter other{other_signal};
  memory.charge(63 * MiB);
  ASSERT_EQ(memory.admit(other, 0, 2 * MiB), Verdict::Full);
  memory.wait(other, Verdict::Full, 2 * MiB);
  memory.release(62 * MiB);
  EXPECT_EQ(memory.admit(me, 0, 4096), Verdict::Full) << "room, but another client waits for it first";
  EXPECT_EQ(memory.admit(other, 0, 2 * MiB), Verdict::Go) << "the first in line";
  memory.went(other);
  EXPECT_EQ(memory.admit(me, 0, 4096), Verdict::Go) << "then the next";
  memory.release(MiB);
}

class Waiting : public ::testing::Test {
 protected:
  // A signal like a session's wake-up, waited on; true once notified.
  struct Sleeper {
    explicit Sleeper(asio::io_context& io) : signal(io), waiter(signal) {
      asio::co_spawn(
          io,
          [this]() -> awaitable<void> {
            co_await signal.wait();
            woken = true;
          },
          asio::detached);
      io.poll();  // waiting from now on, as a session would be
      io.restart();
    }
    LoopSignal signal;
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

TEST_F(Waiting, TheFirstWaiterOfRoomIsWokenOnceItsRequestFits) {
  memory.charge(64 * MiB);
  Sleeper s(io);
  memory.wait(s.waiter, Verdict::Full, 8192);
  EXPECT_EQ(memory.paused(), 1u);
  run();
  EXPECT_FALSE(s.woken);
  memory.release(4096);
  run();
  EXPECT_FALSE(s.woken) << "4 KiB back: its 8 KiB do not fit yet";
  memory.release(4096);
  run();
  EXPECT_TRUE(s.woken);
  EXPECT_EQ(memory.paused(), 1u) << "it keeps its place until it goes on";
  memory.went(s.waiter);
  EXPECT_EQ(memory.paused(), 0u);
  memory.release(64 * MiB - 8192);
}

TEST_F(Waiting, AWaiterOfThePressureRuleIsWokenOnlyUnderHalf) {
  memory.charge(40 * MiB);
  Sleeper s(io);
  memory.wait(s.waiter, Verdict::Pressure, 4096);
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
    memory.wait(s.waiter, Verdict::Full, 4096);
    memory.wait(s.waiter, Verdict::Full, 4096);  // registering twice is once
    EXPECT_EQ(memory.paused(), 1u);
    s.signal.notify();
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
