#include "proxy/io/buffer_pool.hpp"

#include <algorithm>
#include <bit>
#include <stdexcept>
#include <utility>

namespace bscache::proxy {

namespace {
size_t class_bytes(unsigned size_class) {
  return BufferPool::kSmallestClass << size_class;
}

unsigned class_for(size_t size) {
  const size_t rounded = std::bit_ceil(std::max(size, BufferPool::kSmallestClass));
  return static_cast<unsigned>(std::countr_zero(rounded) - std::countr_zero(BufferPool::kSmallestClass));
}
}  // namespace

size_t PooledBuffer::footprint(size_t size) {
  return class_bytes(class_for(size));
}

PooledBuffer::PooledBuffer(PooledBuffer&& other) noexcept
    : shelves_(std::move(other.shelves_)),
      data_(std::move(other.data_)),
      size_(std::exchange(other.size_, 0)),
      size_class_(other.size_class_) {}

PooledBuffer& PooledBuffer::operator=(PooledBuffer&& other) noexcept {
  if (this != &other) {
    give_back();
    shelves_ = std::move(other.shelves_);
    data_ = std::move(other.data_);
    size_ = std::exchange(other.size_, 0);
    size_class_ = other.size_class_;
  }
  return *this;
}

PooledBuffer::~PooledBuffer() {
  give_back();
}

void PooledBuffer::give_back() {
  if (!data_ || !shelves_) return;
  const size_t bytes = class_bytes(size_class_);
  std::lock_guard lock(shelves_->mutex);
  if (shelves_->idle_bytes + bytes <= shelves_->max_idle_bytes) {
    shelves_->idle[size_class_].push_back(std::move(data_));
    shelves_->idle_bytes += bytes;
  }
  data_.reset();  // over the cap: freed here
  size_ = 0;
}

BufferPool::BufferPool(size_t max_idle_bytes) : shelves_(std::make_shared<PooledBuffer::Shelves>(max_idle_bytes)) {}

PooledBuffer BufferPool::acquire(size_t size) {
  PooledBuffer buffer;
  if (size == 0) return buffer;
  const unsigned size_class = class_for(size);
  if (size_class >= kClasses) throw std::length_error("buffer larger than the pool's largest class");
  buffer.shelves_ = shelves_;
  buffer.size_ = size;
  buffer.size_class_ = size_class;
  {
    std::lock_guard lock(shelves_->mutex);
    ++shelves_->acquisitions;
    auto& shelf = shelves_->idle[size_class];
    if (!shelf.empty()) {
      buffer.data_ = std::move(shelf.back());
      shelf.pop_back();
      shelves_->idle_bytes -= class_bytes(size_class);
      return buffer;
    }
    ++shelves_->allocations;
  }
  // Uninitialised on purpose: upstream or the client fills it.
  buffer.data_ = std::make_unique_for_overwrite<uint8_t[]>(class_bytes(size_class));
  return buffer;
}

size_t BufferPool::idle_bytes() const {
  std::lock_guard lock(shelves_->mutex);
  return shelves_->idle_bytes;
}

uint64_t BufferPool::allocations() const {
  std::lock_guard lock(shelves_->mutex);
  return shelves_->allocations;
}

uint64_t BufferPool::acquisitions() const {
  std::lock_guard lock(shelves_->mutex);
  return shelves_->acquisitions;
}

void BufferPool::shrink(size_t keep_bytes) {
  std::vector<std::unique_ptr<uint8_t[]>> freed;  // freed after the lock is let go
  {
    std::lock_guard lock(shelves_->mutex);
    for (unsigned c = 0; c < kClasses && shelves_->idle_bytes > keep_bytes; ++c) {
      auto& shelf = shelves_->idle[c];
      while (!shelf.empty() && shelves_->idle_bytes > keep_bytes) {
        freed.push_back(std::move(shelf.back()));
        shelf.pop_back();
        shelves_->idle_bytes -= class_bytes(c);
      }
      if (shelf.empty()) shelf.shrink_to_fit();
    }
  }
}

}  // namespace bscache::proxy
