// PipePool: pipes of the capacity asked for, reused only when empty.
#include "proxy/pipe_pool.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <array>

namespace bscache::proxy {
namespace {

TEST(PipePool, GivesPipesThatHoldWhatWasAskedAndReusesEmptyOnes) {
  PipePool pool;
  int first_read_fd = -1;
  {
    auto pipe = pool.acquire(100'000);
    ASSERT_TRUE(pipe);
    EXPECT_GE(::fcntl(pipe->write_fd(), F_GETPIPE_SZ), 100'000);
    EXPECT_EQ(pipe->capacity(), size_t{128} * 1024);
    first_read_fd = pipe->read_fd();
  }
  auto again = pool.acquire(70'000);  // the same size class
  ASSERT_TRUE(again);
  EXPECT_EQ(again->read_fd(), first_read_fd);
  EXPECT_EQ(pool.created(), 1u);
}

TEST(PipePool, APipeLeftWithDataIsClosedNotReused) {
  PipePool pool;
  int read_fd = -1;
  {
    auto pipe = pool.acquire(4096);
    ASSERT_TRUE(pipe);
    const std::array<char, 3> bytes{'a', 'b', 'c'};
    ASSERT_EQ(::write(pipe->write_fd(), bytes.data(), bytes.size()), 3);
    read_fd = pipe->read_fd();
  }
  EXPECT_EQ(::fcntl(read_fd, F_GETFD), -1) << "the pipe with data in it was not closed";
  auto fresh = pool.acquire(4096);
  ASSERT_TRUE(fresh);
  int unread = -1;
  EXPECT_EQ(::ioctl(fresh->read_fd(), FIONREAD, &unread), 0);
  EXPECT_EQ(unread, 0);
  EXPECT_EQ(pool.created(), 2u);
}

TEST(PipePool, StaysUnderItsOpenAndIdleLimits) {
  PipePool pool(/*max_idle=*/1, /*max_open=*/2);
  auto a = pool.acquire(4096);
  auto b = pool.acquire(200'000);
  ASSERT_TRUE(a && b);
  EXPECT_FALSE(pool.acquire(4096)) << "a third pipe over max_open";
  EXPECT_EQ(pool.open(), 2u);
  b.reset();  // idle now: the one kept
  a.reset();  // over max_idle: closed
  EXPECT_EQ(pool.open(), 1u);
  // At the limit again, an idle pipe of another size is closed to make room.
  auto c = pool.acquire(4096);
  auto d = pool.acquire(4096);
  ASSERT_TRUE(c && d);
  EXPECT_EQ(pool.open(), 2u);
}

TEST(PipePool, RefusesWhatNoPipeCanHold) {
  PipePool pool;
  EXPECT_FALSE(pool.acquire(0));
  EXPECT_FALSE(pool.acquire(PipePool::kMaxBytes + 1));
}

}  // namespace
}  // namespace bscache::proxy
