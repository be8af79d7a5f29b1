// MemoryReclaimer: gives memory back to the system once clients let go of it.
//
// Freed memory does not leave the process by itself: the buffer pool keeps up
// to its cap of idle buffers for reuse, and glibc keeps freed heap blocks
// (the loop's, and those of the arenas the libnbd threads allocate from) for
// the next malloc. After a client that held a lot leaves or drains, that
// would keep RSS at its peak for good. Once a second this looks at what
// happened since:
//   - a buffer pool nobody took a buffer from for a whole second is shrunk to
//     kQuietPoolBytes (busy, it keeps its cap: reuse is what keeps big
//     transfers fast);
//   - if the pool shrank, or the bytes clients hold fell by kTrimAfter and to
//     a quarter of their peak since the last trim, malloc_trim(0) runs, at
//     most every kTrimInterval, on a thread of its own so the loop never
//     waits for it.
// Nothing of this runs per request: the hot path only moves integers in
// ClientMemory.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <thread>

#include "proxy/io/asio.hpp"
#include "proxy/io/buffer_pool.hpp"
#include "proxy/io/client_memory.hpp"

namespace bscache::proxy {

class MemoryReclaimer {
 public:
  static constexpr size_t kQuietPoolBytes = size_t{8} << 20;
  static constexpr size_t kTrimAfter = size_t{16} << 20;
  static constexpr std::chrono::seconds kTrimInterval{2};

  MemoryReclaimer(asio::io_context& io, ClientMemory& memory, BufferPool& buffers);
  ~MemoryReclaimer();  // joins the trimming thread
  MemoryReclaimer(const MemoryReclaimer&) = delete;
  MemoryReclaimer& operator=(const MemoryReclaimer&) = delete;

  void start();
  void stop();
  // Times malloc_trim ran.
  uint64_t trims() const;

 private:
  void arm();
  void tick();
  void trim_thread();

  asio::steady_timer timer_;
  ClientMemory& memory_;
  BufferPool& buffers_;
  uint64_t last_acquisitions_ = 0;
  std::chrono::steady_clock::time_point last_trim_{};
  bool freed_ = false;  // memory was freed since the last trim
  bool stopped_ = false;

  mutable std::mutex mutex_;
  std::condition_variable wanted_;
  bool trim_requested_ = false;
  bool exiting_ = false;
  uint64_t trims_ = 0;
  std::thread thread_;  // last: started once the rest is ready
};

}  // namespace bscache::proxy
