// LoopSignal: a wake-up that coroutines on one loop wait for and code on the
// same loop gives. notify() resumes every coroutine waiting at that moment
// (in later steps of the loop); one that starts waiting afterwards waits for
// the next notify(). So a waiter checks its condition in a loop:
//
//   while (!finished) co_await signal.wait();
//
// Underneath it is a steady_timer that never expires, woken by cancelling
// it: Boost 1.74 has no channel or condition variable for coroutines.
#pragma once

#include "proxy/io/asio.hpp"

namespace bscache::proxy {

class LoopSignal {
 public:
  explicit LoopSignal(asio::io_context& loop) : timer_(loop, asio::steady_timer::time_point::max()) {}
  LoopSignal(const LoopSignal&) = delete;
  LoopSignal& operator=(const LoopSignal&) = delete;

  // Resumes every coroutine waiting now.
  void notify() { timer_.cancel(); }
  // Resumes at the next notify() (or when the loop is destroyed).
  awaitable<void> wait() { return timer_.async_wait(asio::redirect_error(use_awaitable, woken_)); }

 private:
  asio::steady_timer timer_;
  boost::system::error_code woken_;  // a wake-up is a cancellation: nothing to report
};

}  // namespace bscache::proxy
