// WriteGate: policy::WriteOrder for one export, with the waiting done on the
// loop. Used only for exports whose upstream needs aligned requests, where
// some clients' unaligned writes become read-modify-writes (see
// Session::serve_unaligned_write); everything in it lives on the loop thread.
#pragma once

#include <cstdint>
#include <map>
#include <memory>

#include "policy/write_order.hpp"
#include "proxy/io/asio.hpp"
#include "proxy/io/loop_signal.hpp"

namespace bscache::proxy {

class WriteGate {
 public:
  explicit WriteGate(asio::io_context& io) : io_(io) {}
  WriteGate(const WriteGate&) = delete;
  WriteGate& operator=(const WriteGate&) = delete;

  // A granted claim, released when it goes (however the write ended).
  class Hold {
   public:
    Hold(WriteGate& gate, policy::WriteOrder::Id id) : gate_(&gate), id_(id) {}
    Hold(Hold&& other) noexcept : gate_(std::exchange(other.gate_, nullptr)), id_(other.id_) {}
    Hold& operator=(Hold&&) = delete;
    Hold(const Hold&) = delete;
    Hold& operator=(const Hold&) = delete;
    ~Hold() {
      if (gate_) gate_->release(id_);
    }

   private:
    WriteGate* gate_;
    policy::WriteOrder::Id id_;
  };

  // Waits until [offset, offset + length) may be written: `exclusive` for a
  // read-modify-write, shared for any other write, trim or zero.
  awaitable<Hold> enter(uint64_t offset, uint64_t length, bool exclusive);

 private:
  void release(policy::WriteOrder::Id id);

  asio::io_context& io_;
  policy::WriteOrder order_;
  // Claims not granted yet: each waits on its signal, notified when granted.
  std::map<policy::WriteOrder::Id, std::shared_ptr<LoopSignal>> waiting_;
};

}  // namespace bscache::proxy
