#include "proxy/upstream/pool.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <future>
#include <stdexcept>

#include <boost/asio/dispatch.hpp>

#include "proxy/io/loop_signal.hpp"
#include "proxy/upstream/wire_connection.hpp"

namespace bscache::proxy {

uint16_t wire_command(UpstreamOp op) {
  switch (op) {
    case UpstreamOp::Read: return wire::kCmdRead;
    case UpstreamOp::Write: return wire::kCmdWrite;
    case UpstreamOp::Flush: return wire::kCmdFlush;
    case UpstreamOp::Trim: return wire::kCmdTrim;
    case UpstreamOp::Zero: return wire::kCmdWriteZeroes;
    case UpstreamOp::Cache: return wire::kCmdCache;
    case UpstreamOp::BlockStatus: return wire::kCmdBlockStatus;
  }
  return wire::kCmdFlush;
}

namespace {
bool is_mutation(UpstreamOp op) {
  return op == UpstreamOp::Write || op == UpstreamOp::Trim || op == UpstreamOp::Zero;
}

// What a command weighs when choosing the least loaded connection.
uint64_t load_of(const CommandArgs& args) {
  constexpr uint64_t kPerCommand = 4096;
  return kPerCommand + (args.pipes.empty() ? args.buffer.size() : args.length);
}

const char* op_name(UpstreamOp op) {
  return wire::command_name(wire_command(op));
}

// A command whose effect length only an extended request header carries.
bool needs_extended_headers(const CommandArgs& args) {
  const bool effect_length = args.op == UpstreamOp::Trim || args.op == UpstreamOp::Zero || args.op == UpstreamOp::Cache;
  return effect_length && args.length > wire::kMaxCompactLength;
}

// Which of `wanted` connections are libnbd's with --data-path wire: the first
// half (at least one); the rest are the wire client's.
size_t libnbd_half(size_t wanted) {
  return (wanted + 1) / 2;
}
}  // namespace

// A command whose completion resumes an awaiting coroutine (or any handler).
template <typename Handler>
struct UpstreamPool::PendingWith final : UpstreamCommand {
  explicit PendingWith(Handler h) : handler(std::move(h)) {}
  Handler handler;
  void deliver() override {
    auto executor = asio::get_associated_executor(handler);
    asio::dispatch(executor, [h = std::move(handler), r = std::move(result)]() mutable { h(std::move(r)); });
  }
};

std::vector<OpenedUpstream> UpstreamPool::connect(const UpstreamTarget& target, const UpstreamOptions& options) {
  std::vector<OpenedUpstream> opened;
  opened.push_back(open_libnbd_upstream(target));
  const UpstreamInfo first = opened.front().info;  // a copy: `opened` grows
  // More than one connection only where upstream promises they see one state.
  const size_t wanted = first.can_multi_conn ? std::max(1u, options.connections) : 1u;
  const bool wire = options.data_path == UpstreamOptions::DataPath::Wire && wanted > 1;
  // The others open side by side, each on a thread of its own: a handshake
  // is mostly waiting for upstream (nbdkit takes 10-15 ms to answer a GO
  // here), and opened one after another they kept an export's first client
  // waiting for all of them in turn.
  std::vector<std::future<OpenedUpstream>> others;
  others.reserve(wanted - 1);
  for (size_t i = 1; i < wanted; ++i) {
    const bool for_wire = wire && i >= libnbd_half(wanted);
    others.push_back(std::async(std::launch::async, [&target, for_wire] {
      return for_wire ? open_wire_upstream(target) : open_libnbd_upstream(target);
    }));
  }
  // In order, up to the first that failed: which half a connection belongs
  // to follows from its place. Those after it are closed as `others` goes
  // (a future of std::async waits for its open to end).
  for (auto& other : others) {
    try {
      OpenedUpstream next = other.get();
      // Reached by the same name as the first: the same export, unless upstream says otherwise.
      if (next.info.export_name != first.export_name || next.info.size != first.size) {
        throw std::runtime_error("upstream answered with another export (\"" + next.info.export_name + "\", " +
                                 std::to_string(next.info.size) + " bytes)");
      }
      opened.push_back(std::move(next));
    } catch (const std::exception& e) {
      spdlog::warn("upstream connection {} of {}: {}; going on with {}", opened.size() + 1, wanted, e.what(),
                   opened.size());
      break;
    }
  }
  return opened;
}

UpstreamPool::UpstreamPool(asio::io_context& loop, std::vector<OpenedUpstream> opened, const UpstreamTarget& target,
                           UpstreamOptions options, Metrics& metrics)
    : loop_(loop), metrics_(metrics) {
  if (opened.empty()) throw std::logic_error("UpstreamPool: no connection");
  info_ = opened.front().info;
  // Messages already posted when the pool goes (an idle export closed while
  // a connection's news was on its way) find it gone: commands are still
  // delivered, with ESHUTDOWN, and the news is dropped.
  std::weak_ptr<UpstreamPool*> alive = alive_;
  auto complete_all = [alive](UpstreamBatch& batch) {
    auto pool = alive.lock();
    for (auto& command : batch) {
      if (pool) {
        (*pool)->complete(std::move(command));
      } else {
        command->result = CommandResult::failed(ESHUTDOWN);
        command->deliver();
      }
    }
  };
  // A libnbd connection hands back on its own thread: one message to the loop per batch.
  auto finished_elsewhere = [this, complete_all](UpstreamBatch batch) {
    asio::post(loop_, [complete_all, b = std::move(batch)]() mutable { complete_all(b); });
  };
  // A wire connection runs on the loop: its batches complete where they are.
  // Not once the pool is going: its waiters then resume in a later step, not
  // inside the pool's destructor.
  auto finished_here = [alive, complete_all, finished_elsewhere](UpstreamBatch batch) {
    if (alive.expired()) {
      finished_elsewhere(std::move(batch));
    } else {
      complete_all(batch);
    }
  };
  auto changed = [this, alive](size_t index, std::optional<UpstreamInfo> reconnected) {
    asio::post(loop_, [alive, index, r = std::move(reconnected)]() mutable {
      if (auto pool = alive.lock()) (*pool)->connection_changed(index, std::move(r));
    });
  };
  connections_.resize(opened.size());
  // --data-path wire: the second half read through bscache's own client. A
  // connection bscache negotiated itself can only be that (connect() opens
  // those for the second half of the connections it meant to open, and a
  // shorter pool only has a shorter first half).
  const bool wire = options.data_path == UpstreamOptions::DataPath::Wire && opened.size() > 1;
  const size_t through_libnbd = libnbd_half(opened.size());
  for (size_t i = 0; i < opened.size(); ++i) {
    Slot& slot = connections_[i];
    slot.extended_headers = opened[i].info.extended_headers;
    if (opened[i].negotiated_by_bscache || (wire && i >= through_libnbd && WireConnection::usable(opened[i]))) {
      slot.connection =
          std::make_unique<WireConnection>(loop_, i, std::move(opened[i]), target, options, finished_here, changed);
    } else {
      slot.connection = std::make_unique<LibnbdConnection>(i, std::move(opened[i].handle), target, options,
                                                           finished_elsewhere, changed);
    }
  }
  metrics_.upstream_connections = connections_.size();
  count_extended_headers();
}

void UpstreamPool::count_extended_headers() {
  metrics_.upstream_extended_headers = static_cast<uint64_t>(std::count_if(
      connections_.begin(), connections_.end(), [](const Slot& s) { return s.up && s.extended_headers; }));
}

UpstreamPool::~UpstreamPool() {
  alive_.reset();        // what the threads posted and the loop has not run yet finds the pool gone
  connections_.clear();  // joins every connection's thread
  metrics_.upstream_connections = 0;
  metrics_.upstream_extended_headers = 0;
}

size_t UpstreamPool::connections_up() const {
  size_t up = 0;
  for (const auto& s : connections_) up += s.up ? 1 : 0;
  return up;
}

size_t UpstreamPool::wire_connections() const {
  size_t wire = 0;
  for (const auto& s : connections_) wire += s.connection->kind() == UpstreamConnection::Kind::Wire ? 1 : 0;
  return wire;
}

bool UpstreamPool::splices() const {
  return std::any_of(connections_.begin(), connections_.end(),
                     [](const Slot& s) { return s.up && s.connection->splices(); });
}

std::optional<size_t> UpstreamPool::pick(const CommandArgs& args, std::optional<size_t> avoid) const {
  const UpstreamOp op = args.op;
  auto least_loaded = [&](auto suits) {
    std::optional<size_t> best;
    for (size_t i = 0; i < connections_.size(); ++i) {
      const Slot& s = connections_[i];
      if (s.up && i != avoid && suits(s) && (!best || s.load < connections_[*best].load)) best = i;
    }
    return best;
  };
  if (needs_extended_headers(args)) return least_loaded([](const Slot& s) { return s.extended_headers; });
  if (!args.pipes.empty()) return least_loaded([](const Slot& s) { return s.connection->splices(); });
  const bool libnbd_only = op != UpstreamOp::Read && op != UpstreamOp::Cache;
  auto of_kind = [](UpstreamConnection::Kind kind) {
    return [kind](const Slot& s) { return s.connection->kind() == kind; };
  };
  if (libnbd_only) return least_loaded(of_kind(UpstreamConnection::Kind::Libnbd));
  if (auto wire = least_loaded(of_kind(UpstreamConnection::Kind::Wire))) return wire;
  return least_loaded([](const Slot&) { return true; });
}

// The one connection due for a flush, if exactly one is; else the least loaded.
std::optional<size_t> UpstreamPool::flush_target() const {
  for (size_t i = 0; i < connections_.size(); ++i) {
    if (connections_[i].up && connections_[i].wrote_since_flush) return i;
  }
  return pick({.op = UpstreamOp::Flush, .buffer = {}, .offset = 0, .length = 0, .flags = {}});
}

awaitable<CommandResult> UpstreamPool::run(CommandArgs args, CancelFlag cancelled) {
  return asio::async_initiate<decltype(use_awaitable), void(CommandResult)>(
      [this, args, cancelled = std::move(cancelled)](auto handler) mutable {
        auto command = std::make_unique<PendingWith<decltype(handler)>>(std::move(handler));
        command->args = args;
        command->cancelled = std::move(cancelled);
        // A flush with no connection due goes where a write last went, or anywhere.
        if (auto slot = args.op == UpstreamOp::Flush ? flush_target() : pick(args)) {
          send(*slot, std::move(command));
        } else {
          unsendable(command->result, args);
          ++in_flight_;
          command->connection = connections_.size();  // none
          asio::post(loop_, [this, c = std::move(command)]() mutable { complete(std::move(c)); });
        }
      },
      use_awaitable);
}

awaitable<CommandResult> UpstreamPool::block_status(uint64_t offset, uint64_t length, CommandFlags flags) {
  return run({.op = UpstreamOp::BlockStatus, .buffer = {}, .offset = offset, .length = length, .flags = flags});
}

// Every connection that carried a write since its last flush is flushed; the
// client's FLUSH succeeds only if all of them do. The flushes go out at once;
// the last answer notifies `all_answered`.
struct UpstreamPool::FlushFanOut {
  explicit FlushFanOut(asio::io_context& loop) : all_answered(loop) {}
  size_t remaining = 0;
  CommandResult result;
  LoopSignal all_answered;
};

awaitable<CommandResult> UpstreamPool::flush(CommandFlags flags) {
  const CommandArgs args{.op = UpstreamOp::Flush, .buffer = {}, .offset = 0, .length = 0, .flags = flags};
  if (lost_unflushed_writes_) {
    // Writes acknowledged over a connection that died before any flush may
    // not have reached stable storage: say so once, to the next flusher.
    lost_unflushed_writes_ = false;
    spdlog::warn("FLUSH fails: an upstream connection carrying unflushed writes was lost");
    co_return CommandResult::failed(EIO);
  }
  std::vector<size_t> targets;
  for (size_t i = 0; i < connections_.size(); ++i) {
    if (connections_[i].up && connections_[i].wrote_since_flush) targets.push_back(i);
  }
  if (targets.size() <= 1) {
    co_return co_await run(args);  // the common case; run() picks if none is due
  }

  auto fan = std::make_shared<FlushFanOut>(loop_);
  fan->remaining = targets.size();
  for (size_t slot : targets) {
    auto on_answer = [fan](CommandResult r) {
      if (r.error && !fan->result.error) fan->result = std::move(r);
      if (--fan->remaining == 0) fan->all_answered.notify();
    };
    auto command = std::make_unique<PendingWith<decltype(on_answer)>>(std::move(on_answer));
    command->args = args;
    send(slot, std::move(command));
  }
  while (fan->remaining > 0) co_await fan->all_answered.wait();
  co_return std::move(fan->result);
}

void UpstreamPool::send(size_t slot, std::unique_ptr<UpstreamCommand> command) {
  Slot& s = connections_[slot];
  const UpstreamOp op = command->args.op;
  command->connection = slot;
  if (is_mutation(op)) {
    s.wrote_since_flush = true;
    ++s.writes_in_flight;
  } else if (op == UpstreamOp::Flush) {
    // This flush covers the writes that completed before it; one still in
    // flight is not covered, so the connection stays due for a flush.
    s.wrote_since_flush = s.writes_in_flight > 0;
  }
  s.load += load_of(command->args);
  ++in_flight_;
  command->sent_at = std::chrono::steady_clock::now();
  s.connection->submit(std::move(command));
}

// The one place where upstream commands are counted, on the loop thread.
void UpstreamPool::complete(std::unique_ptr<UpstreamCommand> command) {
  --in_flight_;
  const UpstreamOp op = command->args.op;
  const int error = command->result.error;
  if (command->connection < connections_.size()) {
    Slot& s = connections_[command->connection];
    s.load -= load_of(command->args);
    if (is_mutation(op)) --s.writes_in_flight;
    if (op == UpstreamOp::Flush && error) s.wrote_since_flush = true;  // still due
  }
  if (command->never_sent && resend(command)) return;
  const bool sent = !command->never_sent && command->connection < connections_.size();
  if ((command->result.needs_buffer || command->result.needs_pieces) &&
      !sent) {  // nothing went upstream: nothing to count
    command->deliver();
    return;
  }
  if (error != ECANCELED) {  // a cancelled command never left bscache
    const uint16_t type = wire_command(op);
    ++metrics_.upstream_requests[type];
    if (error) {
      ++metrics_.upstream_errors[type];
      spdlog::warn("upstream {} at {}+{} failed: {}", op_name(op), command->args.offset, command->args.length,
                   strerror(error));
    }
    if (op == UpstreamOp::BlockStatus && !error) {
      const auto elapsed = std::chrono::steady_clock::now() - command->sent_at;
      metrics_.upstream_block_status_latency.observe(std::chrono::duration<double>(elapsed).count());
    }
  }
  command->deliver();
}

// A command its connection failed without sending (the connection died
// between our send() and its thread picking the command up) goes to another
// connection: nothing of it reached upstream, and the client should not see
// an error a healthy connection would not have given. Not a FLUSH: it was
// meant to cover writes on the connection that died, which no other
// connection's flush covers (connection_changed fails the next flush instead).
bool UpstreamPool::resend(std::unique_ptr<UpstreamCommand>& command) {
  const bool cancelled = command->cancelled && command->cancelled->load(std::memory_order_relaxed);
  if (command->args.op == UpstreamOp::Flush || cancelled) return false;
  const auto slot = pick(command->args, command->connection);
  if (!slot && (!command->args.pipes.empty() || needs_extended_headers(command->args))) {
    command->result = CommandResult{};
    unsendable(command->result, command->args);  // the caller uses a buffer, or pieces, instead
    return false;
  }
  if (!slot) return false;
  command->never_sent = false;
  command->result = CommandResult{};
  send(*slot, std::move(command));
  return true;
}

void UpstreamPool::unsendable(CommandResult& result, const CommandArgs& args) {
  if (!args.pipes.empty()) {
    result.needs_buffer = true;  // no connection splices now: nothing sent
  } else if (needs_extended_headers(args)) {
    result.needs_pieces = true;  // no connection up takes it whole
  } else {
    result.error = ESHUTDOWN;  // every connection is down; reconnecting
  }
}

void UpstreamPool::connection_changed(size_t index, std::optional<UpstreamInfo> reconnected) {
  Slot& s = connections_[index];
  s.up = reconnected.has_value();
  if (!s.up) {
    if (s.wrote_since_flush) lost_unflushed_writes_ = true;
    s.wrote_since_flush = false;
  } else {
    ++metrics_.upstream_reconnects;
    s.extended_headers = reconnected->extended_headers;
  }
  metrics_.upstream_connections = connections_up();
  count_extended_headers();
  if (on_state_) on_state_(std::move(reconnected));
}

void UpstreamPool::shutdown() {
  for (auto& s : connections_) s.connection->disconnect();
}

}  // namespace bscache::proxy
