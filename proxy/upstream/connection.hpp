// UpstreamConnection: what UpstreamPool needs of one upstream connection, whichever
// engine moves its bytes (LibnbdConnection: libnbd on a thread of its own;
// WireConnection: bscache's own transmission client on the loop).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "proxy/negotiation/upstream_info.hpp"
#include "proxy/upstream/command.hpp"

namespace bscache::proxy {

// Set by the client side when nobody wants the command's answer any more
// (the client disconnected): a command not yet sent upstream is then dropped
// with ECANCELED instead of being sent.
using CancelFlag = std::shared_ptr<const std::atomic<bool>>;

// A command on its way through a connection. The pool creates it, the
// connection fills `result`, and hands it back through its `Finished` callback.
struct UpstreamCommand {
  CommandArgs args;
  CommandResult result;
  CancelFlag cancelled;
  size_t connection = 0;
  std::chrono::steady_clock::time_point sent_at;  // by the pool, on the loop thread
  std::chrono::steady_clock::time_point started;  // by the connection, when it sends the command
  std::vector<UpstreamCommand*>* done = nullptr;  // where libnbd's callback records completion
  // Set by the connection when it failed the command without sending it (its
  // upstream had just died): nothing reached upstream, so the pool may send it
  // on another connection instead of failing the client's request.
  bool never_sent = false;
  virtual ~UpstreamCommand() = default;
  // Resumes whoever waits for the result. Called on the loop thread, once.
  virtual void deliver() = 0;
};

using UpstreamBatch = std::vector<std::unique_ptr<UpstreamCommand>>;

class UpstreamConnection {
 public:
  // Every command that finished in one go (one wake-up of a connection's
  // thread, one read of the wire); may be called on any thread: the receiver
  // moves them to its own.
  using Finished = std::function<void(UpstreamBatch)>;
  // Lost (nullopt) or re-established (with what the new connection negotiated).
  using StateChanged = std::function<void(size_t index, std::optional<UpstreamInfo> reconnected)>;

  virtual ~UpstreamConnection() = default;
  // The command goes upstream soon after; its result comes back through Finished, never from inside submit().
  virtual void submit(std::unique_ptr<UpstreamCommand> command) = 0;
  // Asks upstream to disconnect once what is in flight is answered.
  virtual void disconnect() = 0;
  // Libnbd connections carry every command; wire connections carry READ
  // and CACHE (and spliced WRITEs) only, never BLOCK_STATUS.
  enum class Kind : uint8_t { Libnbd, Wire };
  virtual Kind kind() const = 0;
  // Whether it takes a READ or WRITE through pipes (CommandArgs::pipes).
  virtual bool splices() const = 0;
};

}  // namespace bscache::proxy
