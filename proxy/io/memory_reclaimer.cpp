#include "proxy/io/memory_reclaimer.hpp"

#include <malloc.h>

#include <spdlog/spdlog.h>

namespace bscache::proxy {

MemoryReclaimer::MemoryReclaimer(asio::io_context& io, ClientMemory& memory, BufferPool& buffers)
    : timer_(io), memory_(memory), buffers_(buffers), thread_([this] { trim_thread(); }) {}

MemoryReclaimer::~MemoryReclaimer() {
  {
    std::lock_guard lock(mutex_);
    exiting_ = true;
  }
  wanted_.notify_one();
  thread_.join();
}

void MemoryReclaimer::start() {
  last_acquisitions_ = buffers_.acquisitions();
  arm();
}

void MemoryReclaimer::stop() {
  stopped_ = true;
  timer_.cancel();
}

uint64_t MemoryReclaimer::trims() const {
  std::lock_guard lock(mutex_);
  return trims_;
}

void MemoryReclaimer::arm() {
  timer_.expires_after(std::chrono::seconds(1));
  timer_.async_wait([this](const boost::system::error_code& ec) {
    if (ec || stopped_) return;
    tick();
    arm();
  });
}

void MemoryReclaimer::tick() {
  const uint64_t acquisitions = buffers_.acquisitions();
  if (acquisitions == last_acquisitions_ && buffers_.idle_bytes() > kQuietPoolBytes) {
    buffers_.shrink(kQuietPoolBytes);
    freed_ = true;
  }
  last_acquisitions_ = acquisitions;
  const size_t peak = memory_.peak();
  const size_t held = memory_.held();
  if (peak - held >= kTrimAfter && held <= peak / 4) {
    freed_ = true;
    memory_.take_peak();
  }
  // What was freed waits for the next trim however soon it came after the last.
  const auto now = std::chrono::steady_clock::now();
  if (!freed_ || now - last_trim_ < kTrimInterval) return;
  freed_ = false;
  last_trim_ = now;
  {
    std::lock_guard lock(mutex_);
    trim_requested_ = true;
  }
  wanted_.notify_one();
}

void MemoryReclaimer::trim_thread() {
  std::unique_lock lock(mutex_);
  for (;;) {
    wanted_.wait(lock, [this] { return trim_requested_ || exiting_; });
    if (exiting_) return;
    trim_requested_ = false;
    lock.unlock();
    const auto began = std::chrono::steady_clock::now();
    malloc_trim(0);
    const auto took = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - began);
    spdlog::debug("memory: malloc_trim took {} ms", took.count());
    lock.lock();
    ++trims_;
  }
}

}  // namespace bscache::proxy
