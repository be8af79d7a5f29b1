// PipePool: pipes of the capacity asked for, reused only when empty.
#include "proxy/io/pipe_pool.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <linux/capability.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <fstream>

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

// Takes CAP_SYS_RESOURCE out of the effective set while it lives, so the
// kernel refuses a pipe larger than /proc/sys/fs/pipe-max-size as it does
// for an unprivileged bscache. (Not by running out of descriptors: the
// sanitizers need a pipe to check the logging call the refusal makes.)
class WithoutCapSysResource {
 public:
  WithoutCapSysResource() {
    if (::syscall(SYS_capget, &header_, saved_.data()) != 0) return;
    auto lowered = saved_;
    lowered[CAP_SYS_RESOURCE / 32].effective &= ~(1u << (CAP_SYS_RESOURCE % 32));
    changed_ = ::syscall(SYS_capset, &header_, lowered.data()) == 0;
  }
  ~WithoutCapSysResource() {
    if (changed_) ::syscall(SYS_capset, &header_, saved_.data());
  }
  WithoutCapSysResource(const WithoutCapSysResource&) = delete;
  WithoutCapSysResource& operator=(const WithoutCapSysResource&) = delete;

 private:
  __user_cap_header_struct header_{_LINUX_CAPABILITY_VERSION_3, 0};
  std::array<__user_cap_data_struct, _LINUX_CAPABILITY_U32S_3> saved_{};
  bool changed_ = false;
};

size_t pipe_max_size() {
  std::ifstream in("/proc/sys/fs/pipe-max-size");
  size_t bytes = 0;
  in >> bytes;
  return bytes;
}

TEST(PipePool, AfterARefusalAsksTheKernelAgainOnlyOnceItsPipesShrank) {
  if (pipe_max_size() >= PipePool::kMaxBytes) GTEST_SKIP() << "fs.pipe-max-size allows the largest pipe";
  PipePool pool(/*max_idle=*/0, /*max_open=*/1024, std::chrono::hours(1));
  auto held = pool.acquire(4096);
  ASSERT_TRUE(held);
  {
    WithoutCapSysResource unprivileged;
    EXPECT_FALSE(pool.acquire(PipePool::kMaxBytes));
  }
  EXPECT_EQ(pool.refused(), 1u);
  // The pool holds as much as when it was refused: it does not ask again
  // (each attempt costs four system calls), whatever the kernel would say.
  EXPECT_FALSE(pool.acquire(PipePool::kMaxBytes));
  EXPECT_FALSE(pool.acquire(4096));
  EXPECT_EQ(pool.refused(), 1u);
  EXPECT_EQ(pool.created(), 1u);
  held.reset();  // closed (max_idle 0): below the room it had when refused
  auto fresh = pool.acquire(4096);
  EXPECT_TRUE(fresh);
  EXPECT_EQ(pool.created(), 2u);
}

TEST(PipePool, ARefusalIsForgottenAfterItsMemory) {
  if (pipe_max_size() >= PipePool::kMaxBytes) GTEST_SKIP() << "fs.pipe-max-size allows the largest pipe";
  PipePool pool(/*max_idle=*/64, /*max_open=*/1024, std::chrono::milliseconds(0));
  {
    WithoutCapSysResource unprivileged;
    EXPECT_FALSE(pool.acquire(PipePool::kMaxBytes));
  }
  EXPECT_EQ(pool.refused(), 1u);
  // Asked again: granted with CAP_SYS_RESOURCE back, or refused a second time without it.
  const bool granted = pool.acquire(PipePool::kMaxBytes).has_value();
  EXPECT_EQ(pool.created() + pool.refused(), 2u) << "granted: " << granted;
}

}  // namespace
}  // namespace bscache::proxy
