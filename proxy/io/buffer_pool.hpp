// BufferPool: reusable, uninitialised payload buffers for READ and WRITE.
//
// These buffers are where payload bytes live inside bscache when they are not
// spliced through pipes (see PipePool, which bscache prefers): a READ's payload
// is received from upstream straight into one and sent to the client from it
// (a gathered write puts the reply header in front); a WRITE's payload is
// received from the client straight into one and sent upstream from it.
// bscache itself copies no payload byte: the only copies are the kernel's
// socket receive and send.
//
// Why a pool: a fresh multi-megabyte allocation is a fresh mmap, faulted in
// page by page and unmapped after use; page faults are expensive on the VMs
// this runs on. Buffers come in power-of-two size classes (4 KiB to 64 MiB),
// are never zero-filled, and return to the pool when their owner is done.
// Idle buffers are kept up to a byte cap; beyond it they are freed. Buffers in
// use are bounded by the sessions' byte budgets (see SessionLimits).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <vector>

namespace bscache::proxy {

class BufferPool;

// An owned buffer of `size()` bytes from the pool; returns itself on destruction.
class PooledBuffer {
 public:
  PooledBuffer() = default;
  PooledBuffer(PooledBuffer&& other) noexcept;
  PooledBuffer& operator=(PooledBuffer&& other) noexcept;
  ~PooledBuffer();

  uint8_t* data() const { return data_.get(); }
  size_t size() const { return size_; }
  // Bytes the buffer really takes: its whole size class (0 when empty).
  size_t capacity() const { return data_ ? footprint(size_) : 0; }
  // What a buffer of `size` bytes takes (its power-of-two class, at least 4 KiB).
  static size_t footprint(size_t size);
  std::span<uint8_t> span() const { return {data_.get(), size_}; }
  explicit operator bool() const { return data_ != nullptr; }

 private:
  friend class BufferPool;
  struct Shelves;
  void give_back();

  std::shared_ptr<Shelves> shelves_;  // the pool's storage outlives every buffer
  std::unique_ptr<uint8_t[]> data_;
  size_t size_ = 0;
  unsigned size_class_ = 0;
};

class BufferPool {
 public:
  // Keeps at most `max_idle_bytes` of idle buffers for reuse. Default: 64 MiB.
  explicit BufferPool(size_t max_idle_bytes = size_t{64} << 20);

  // A buffer of exactly `size` usable bytes (0 gives an empty buffer), contents undefined.
  PooledBuffer acquire(size_t size);

  size_t idle_bytes() const;
  // Buffers handed out that were not already in the pool (each one a fresh allocation).
  uint64_t allocations() const;
  // Buffers handed out, fresh or reused.
  uint64_t acquisitions() const;
  // Frees idle buffers, smallest first, until at most `keep_bytes` of them are
  // left (a pool nobody has asked for a while: see MemoryReclaimer).
  void shrink(size_t keep_bytes);

  static constexpr size_t kSmallestClass = 4096;
  static constexpr unsigned kClasses = 15;  // 4 KiB << 14 = 64 MiB

 private:
  std::shared_ptr<PooledBuffer::Shelves> shelves_;
};

// The pool's storage, shared by the pool and every buffer it handed out.
struct PooledBuffer::Shelves {
  explicit Shelves(size_t max_idle) : max_idle_bytes(max_idle) {}
  mutable std::mutex mutex;  // buffers may be returned from any thread
  std::array<std::vector<std::unique_ptr<uint8_t[]>>, BufferPool::kClasses> idle;
  size_t idle_bytes = 0;
  const size_t max_idle_bytes;
  uint64_t allocations = 0;
  uint64_t acquisitions = 0;
};

}  // namespace bscache::proxy
