// What BlockStatusService needs of upstream, and no more: one call. The real
// one is UpstreamPool; unit tests stand in a fake that answers on command.
#pragma once

#include <cstdint>

#include "proxy/io/asio.hpp"
#include "proxy/upstream/command.hpp"

namespace bscache::proxy {

class BlockStatusUpstream {
 public:
  virtual ~BlockStatusUpstream() = default;
  // The command is handed on at the co_await, in the caller's loop step (the
  // race rule relies on this: see UpstreamPool). Completes on the loop thread.
  virtual awaitable<CommandResult> block_status(uint64_t offset, uint64_t length, CommandFlags flags) = 0;
};

}  // namespace bscache::proxy
