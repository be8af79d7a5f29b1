#include "proxy/upstream/wire_connection.hpp"

#include <fcntl.h>
#include <libnbd.h>
#include <netinet/in.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <deque>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include <boost/asio/generic/stream_protocol.hpp>
#include <boost/asio/write.hpp>

#include "proxy/io/pipe_pool.hpp"
#include "proxy/upstream/reconnector.hpp"
#include "proxy/wire/codec.hpp"
#include "proxy/wire/errors.hpp"
#include "proxy/wire/protocol.hpp"
#include "proxy/wire/reply_parser.hpp"

namespace bscache::proxy {

namespace {
// One gathered write carries at most this many buffers (Asio's limit per sendmsg).
constexpr size_t kMaxGather = 64;
}  // namespace

struct WireConnection::State : std::enable_shared_from_this<State> {
  using Clock = std::chrono::steady_clock;
  using Socket = asio::generic::stream_protocol::socket;

  struct InFlight {
    std::unique_ptr<UpstreamCommand> command;
    uint64_t cookie = 0;
    wire::RequestBytes header{};
    wire::ReplyTarget target;
    bool sent = false;  // part of a write handed to the socket
    // A READ into a pipe whose pipe filled up before its payload was in: the
    // rest was read and dropped, and the caller reads again into a buffer.
    bool overflowed = false;
    uint64_t sunk = 0;  // bytes of it spliced so far
  };

  State(asio::io_context& l, size_t i, const UpstreamTarget& t, UpstreamOptions o, Finished f, StateChanged c)
      : loop(l),
        index(i),
        reconnector(i, t, o),
        finished(std::move(f)),
        state_changed(std::move(c)),
        timeout_timer(l),
        reconnect_timer(l) {}

  asio::io_context& loop;
  const size_t index;
  Reconnector reconnector;
  const Finished finished;
  const StateChanged state_changed;

  NbdHandlePtr handle;    // idle once adopted: it only holds the session libnbd negotiated
  bool extended = false;  // requests and replies with extended headers (this connection negotiated them)
  std::optional<Socket> socket;
  uint64_t generation = 0;  // bumped when a connection ends: handlers of the old one see it
  bool up = false;
  bool closing = false;  // disconnect() or destruction: no reconnect
  uint64_t next_cookie = 1;
  std::unordered_map<uint64_t, std::unique_ptr<InFlight>> pending;  // by cookie, sent or not
  std::deque<InFlight*> outbox;                                     // not yet handed to the socket
  std::vector<asio::const_buffer> gather;                           // the write in progress
  bool writing = false, write_posted = false;
  // A WRITE whose payload is in pipes: its header went out with the gathered
  // write; its payload is spliced after it, before anything else is sent.
  InFlight* splicing_out = nullptr;
  uint64_t spliced_out = 0;  // bytes of its payload sent
  bool disconnect_wanted = false, disconnect_sent = false;
  wire::RequestBytes disconnect_request;  // in the connection's header form
  std::optional<wire::ReplyParser> parser;
  std::vector<uint64_t> done;  // cookies the parser finished
  UpstreamBatch batch;         // handed to `finished` once per read or write
  asio::steady_timer timeout_timer;
  bool timeout_armed = false;
  // Set when a READ overflowed its pipe: this connection then stops taking
  // READs into pipes (see splice_payload).
  bool splicing = true;
  std::array<uint8_t, size_t{64} * 1024> discard{};  // the dropped rest of an overflowed READ
  asio::steady_timer reconnect_timer;
  std::thread connector;  // the reconnect attempt, if one ran; joined by the owner

  void adopt(OpenedUpstream opened);
  void submit(std::unique_ptr<UpstreamCommand> command);
  void post_write();
  void start_write();
  void splice_out();
  void complete_done();
  void hand_back();
  void lost(int error, const std::string& why);
  void arm_timeout();
  void check_timeout();
  void schedule_reconnect();
  void start_connector();
  void reconnected(std::optional<OpenedUpstream> opened, const std::string& failure);
  enum class Spliced : uint8_t { Moved, Wait, Overflow, Failed };
  Spliced splice_payload(size_t& moved, std::string& failure);
  static awaitable<void> read_loop(std::shared_ptr<State> self, uint64_t generation);
};

void WireConnection::State::adopt(OpenedUpstream opened) {
  const int fd = duplicate_socket(opened.handle.get());  // usable() was checked by whoever opened it
  sockaddr_storage address{};
  socklen_t length = sizeof address;
  if (::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) == -1) {
    ::close(fd);
    throw std::runtime_error(std::string("getsockname: ") + strerror(errno));
  }
  const int family = address.ss_family;
  const int protocol = (family == AF_INET || family == AF_INET6) ? IPPROTO_TCP : 0;
  socket.emplace(loop);
  boost::system::error_code ec;
  socket->assign(asio::generic::stream_protocol(family, protocol), fd, ec);
  if (ec) {
    ::close(fd);
    socket.reset();
    throw std::runtime_error("adopting the upstream socket: " + ec.message());
  }
  // splice() and the overflow's read_some must never block the loop.
  socket->non_blocking(true, ec);
  handle = std::move(opened.handle);
  extended = opened.info.extended_headers;
  disconnect_request = wire::encode_request({.type = wire::kCmdDisc}, extended);
  parser.emplace(
      [this](uint64_t cookie) -> wire::ReplyTarget* {
        auto it = pending.find(cookie);
        return it == pending.end() || !it->second->sent ? nullptr : &it->second->target;
      },
      extended);
  disconnect_sent = false;
  up = true;
  spdlog::info("upstream connection {}: bscache's own client, {} headers{}", index, extended ? "extended" : "compact",
               opened.negotiated_by_bscache ? " (negotiated by bscache)" : "");
  asio::co_spawn(loop, read_loop(shared_from_this(), generation), asio::detached);
}

void WireConnection::State::submit(std::unique_ptr<UpstreamCommand> command) {
  if (!up || closing) {
    // Submitted before the loop heard this connection was lost: nothing was
    // sent. Handed back in a later step: never from inside submit().
    command->result.error = ESHUTDOWN;
    command->never_sent = true;
    batch.push_back(std::move(command));
    asio::post(loop, [self = shared_from_this()] { self->hand_back(); });
    return;
  }
  auto f = std::make_unique<InFlight>();
  const auto& a = command->args;
  f->cookie = next_cookie++;
  // With extended headers a WRITE's length is its payload's, which the spec
  // has it say with NBD_CMD_FLAG_PAYLOAD_LEN; every other length is an
  // effect length, 64 bits there (the pool sends longer than 4 GiB - 1 only
  // to such a connection).
  const bool payload = extended && a.op == UpstreamOp::Write;
  f->header = wire::encode_request(
      {.flags = static_cast<uint16_t>(a.flags.to_wire() | (payload ? wire::kCmdFlagPayloadLen : 0)),
       .type = wire_command(a.op),
       .cookie = f->cookie,
       .offset = a.offset,
       .length = a.length},
      extended);
  f->target.type = wire_command(a.op);
  f->target.offset = a.offset;
  if (a.op == UpstreamOp::Read) {
    f->target.length = a.length;
    f->target.buffer = a.buffer;
    f->target.sink = !a.pipes.empty();
  }
  f->command = std::move(command);
  outbox.push_back(f.get());
  pending.emplace(f->cookie, std::move(f));
  post_write();
}

// Everything submitted in this loop step goes out in one gathered write.
void WireConnection::State::post_write() {
  if (write_posted || writing) return;
  write_posted = true;
  asio::post(loop, [self = shared_from_this()] {
    self->write_posted = false;
    self->start_write();
  });
}

void WireConnection::State::start_write() {
  if (writing || !up || splicing_out) return;
  gather.clear();
  const auto now = Clock::now();
  while (!outbox.empty() && gather.size() + 2 <= kMaxGather) {
    InFlight* f = outbox.front();
    outbox.pop_front();
    UpstreamCommand& c = *f->command;
    if (c.cancelled && c.cancelled->load(std::memory_order_relaxed)) {
      c.result.error = ECANCELED;  // nobody waits for it: never send it
      batch.push_back(std::move(f->command));
      pending.erase(f->cookie);
      continue;
    }
    f->sent = true;
    c.started = now;
    gather.push_back(asio::buffer(f->header.data(), f->header.size()));
    if (c.args.op == UpstreamOp::Write && !c.args.pipes.empty()) {
      splicing_out = f;  // its payload follows the header, by splice
      spliced_out = 0;
      break;
    }
    if (c.args.op == UpstreamOp::Write && !c.args.buffer.empty()) {
      gather.push_back(asio::buffer(c.args.buffer.data(), c.args.buffer.size()));
    }
  }
  if (!splicing_out && outbox.empty() && disconnect_wanted && !disconnect_sent && gather.size() < kMaxGather) {
    gather.push_back(asio::buffer(disconnect_request.data(), disconnect_request.size()));
    disconnect_sent = true;
  }
  if (!gather.empty()) {
    writing = true;
    arm_timeout();
    asio::async_write(*socket, gather,
                      [self = shared_from_this(), gen = generation](const boost::system::error_code& ec, size_t) {
                        self->writing = false;
                        if (ec && gen == self->generation) {
                          self->lost(ESHUTDOWN, "writing to the server: " + ec.message());
                          return;
                        }
                        if (self->splicing_out) {
                          self->splice_out();
                        } else {
                          self->start_write();
                        }
                      });
  }
  hand_back();  // the cancelled ones, last: their waiters resume right here
}

// The payload of `splicing_out`, from its pipes into the socket (no copy),
// as fast as the socket takes it; then the next gathered write.
void WireConnection::State::splice_out() {
  if (!up) return;
  InFlight* f = splicing_out;
  const CommandArgs& a = f->command->args;
  while (spliced_out < a.length) {
    const auto share = PipePool::share_at(spliced_out, a.length);
    const ssize_t n = ::splice(a.pipes[share.index], nullptr, socket->native_handle(), nullptr, share.bytes,
                               SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    if (n > 0) {
      spliced_out += static_cast<uint64_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) {  // the socket is full (a pipe holding its share never runs dry)
      writing = true;
      socket->async_wait(Socket::wait_write,
                         [self = shared_from_this(), gen = generation](const boost::system::error_code& ec) {
                           self->writing = false;
                           if (gen != self->generation) return;
                           if (ec) {
                             self->lost(ESHUTDOWN, "writing to the server: " + ec.message());
                             return;
                           }
                           self->splice_out();
                         });
      return;
    }
    lost(ESHUTDOWN, n == 0 ? std::string("a WRITE's pipe ran dry") : std::string("splice: ") + strerror(errno));
    return;
  }
  splicing_out = nullptr;
  start_write();
}

// Moves what upstream has of the payload due into its pipe (zero-copy:
// splice(2) hands over the socket's pages). A pipe is sized for its READ with
// room to spare, but counts pieces, not bytes: a stream of small segments (a
// TCP upstream without receive offload) can fill it early. Then the rest of
// that READ is dropped and the caller reads again into a buffer.
WireConnection::State::Spliced WireConnection::State::splice_payload(size_t& moved, std::string& failure) {
  moved = 0;
  auto it = pending.find(parser->cookie());
  InFlight* f = it == pending.end() ? nullptr : it->second.get();
  const size_t due = parser->sink_bytes();
  if (f && f->overflowed) {
    boost::system::error_code ec;
    moved = socket->read_some(asio::buffer(discard.data(), std::min(due, discard.size())), ec);
    if (ec == asio::error::would_block || ec == asio::error::try_again) return Spliced::Wait;
    if (ec) failure = ec == asio::error::eof ? "the server closed the connection" : ec.message();
    return ec ? Spliced::Failed : Spliced::Moved;
  }
  // The parser found the command and checked the data fits the READ.
  const auto share = f ? PipePool::share_at(f->sunk, f->command->args.length) : PipePool::Share{0, 0};
  if (!f || share.index >= f->command->args.pipes.size()) {
    failure = "READ data with nowhere to go";
    return Spliced::Failed;
  }
  const int pipe_fd = f->command->args.pipes[share.index];
  const ssize_t n = ::splice(socket->native_handle(), nullptr, pipe_fd, nullptr, std::min<uint64_t>(due, share.bytes),
                             SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
  if (n > 0) {
    moved = static_cast<size_t>(n);
    f->sunk += moved;
    return Spliced::Moved;
  }
  if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
    failure = n == 0 ? "the server closed the connection" : std::string("splice: ") + strerror(errno);
    return Spliced::Failed;
  }
  if (errno == EINTR) return Spliced::Moved;
  // Nothing to read, or the pipe is full: a full pipe is not writable.
  pollfd pipe_room{.fd = pipe_fd, .events = POLLOUT, .revents = 0};
  if (::poll(&pipe_room, 1, 0) == 1) return Spliced::Wait;
  f->overflowed = true;
  splicing = false;
  spdlog::info("upstream connection {}: a READ's pipe filled before its data was in; reading into buffers from now on",
               index);
  return Spliced::Overflow;
}

awaitable<void> WireConnection::State::read_loop(std::shared_ptr<State> self, uint64_t generation) {
  boost::system::error_code ec;
  for (;;) {
    size_t n = 0;
    if (self->parser->sink_bytes() > 0) {
      std::string failure;
      const Spliced how = self->splice_payload(n, failure);
      if (how == Spliced::Failed) {
        self->lost(ESHUTDOWN, "moving a READ's data: " + failure);
        co_return;
      }
      if (how == Spliced::Overflow) continue;  // the rest is dropped
      if (how == Spliced::Wait) {
        co_await self->socket->async_wait(Socket::wait_read, asio::redirect_error(use_awaitable, ec));
        if (self->generation != generation) co_return;
        if (ec) {
          self->lost(ESHUTDOWN, ec.message());
          co_return;
        }
        continue;
      }
    } else {
      const auto want = self->parser->next();
      n = co_await self->socket->async_read_some(asio::buffer(want.data(), want.size()),
                                                 asio::redirect_error(use_awaitable, ec));
      if (self->generation != generation) co_return;
      if (ec) {
        self->lost(ESHUTDOWN, ec == asio::error::eof ? "the server closed the connection" : ec.message());
        co_return;
      }
    }
    if (!self->parser->received(n, self->done)) {
      self->lost(EIO, "protocol error from the server: " + self->parser->failure());
      co_return;
    }
    if (!self->done.empty()) {
      self->complete_done();
      if (self->generation != generation) co_return;  // lost while the results were handed back
    }
  }
}

void WireConnection::State::complete_done() {
  for (const uint64_t cookie : done) {
    auto it = pending.find(cookie);
    if (it == pending.end()) continue;
    std::unique_ptr<InFlight> f = std::move(it->second);
    pending.erase(it);
    CommandResult& r = f->command->result;
    r.error = errno_from_nbd(f->target.error);
    if (f->overflowed && !r.error) r.needs_buffer = true;
    if (!r.error && !r.needs_buffer && f->command->args.op == UpstreamOp::Read) {
      r.chunks = std::move(f->target.pieces);
    }
    batch.push_back(std::move(f->command));
  }
  done.clear();
  hand_back();
}

void WireConnection::State::hand_back() {
  if (!batch.empty()) finished(std::exchange(batch, {}));
}

// Ends the connection now: what was sent fails with `error`, what was not
// with ESHUTDOWN and marked never sent (the pool may send it elsewhere).
void WireConnection::State::lost(int error, const std::string& why) {
  if (!up) return;
  up = false;
  ++generation;
  boost::system::error_code ignored;
  socket->close(ignored);  // outstanding operations end with operation_aborted and see the new generation
  socket.reset();
  handle.reset();
  parser.reset();
  splicing_out = nullptr;
  for (auto& [cookie, f] : pending) {
    if (!f->command) continue;
    f->command->result = CommandResult::failed(f->sent ? error : ESHUTDOWN);
    f->command->never_sent = !f->sent;
    batch.push_back(std::move(f->command));
  }
  const size_t failed = pending.size();
  pending.clear();
  outbox.clear();
  done.clear();
  if (!closing) reconnector.log_lost(why, failed);
  hand_back();  // the failures reach the loop before the news of the loss
  if (closing) return;
  state_changed(index, std::nullopt);
  if (reconnector.reconnects()) schedule_reconnect();
}

// With --upstream-timeout: a command upstream has not answered in time means
// the connection is stuck; drop it (failing everything in flight) and reconnect.
void WireConnection::State::arm_timeout() {
  if (!reconnector.times_out() || timeout_armed) return;
  timeout_armed = true;
  timeout_timer.expires_after(reconnector.timeout_check_period());
  timeout_timer.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
    self->timeout_armed = false;
    if (!ec) self->check_timeout();
  });
}

void WireConnection::State::check_timeout() {
  if (!up) return;
  const auto now = Clock::now();
  bool waiting = false;
  for (const auto& [cookie, f] : pending) {
    if (!f->sent) continue;
    if (reconnector.overdue(f->command->started, now)) {
      lost(ETIMEDOUT, Reconnector::kOverdue);
      return;
    }
    waiting = true;
  }
  if (waiting) arm_timeout();
}

void WireConnection::State::schedule_reconnect() {
  reconnect_timer.expires_after(reconnector.backoff());
  reconnect_timer.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
    if (!ec && !self->closing) self->start_connector();
  });
}

// Connecting blocks (DNS, TCP, the handshake): it runs on a thread of its own
// and posts the outcome back. The previous attempt has posted its outcome
// already (that is what started this one), so joining it does not wait.
void WireConnection::State::start_connector() {
  if (connector.joinable()) connector.join();
  // The reconnector lives as long as this thread: the owner joins it first.
  connector = std::thread([weak = weak_from_this(), &reconnector = std::as_const(reconnector), &loop = loop] {
    std::optional<OpenedUpstream> opened;
    std::string failure;
    try {
      // The path the first connection took: extended headers again where upstream serves them.
      opened = reconnector.open(Reconnector::For::Wire);
      if (!usable(*opened)) throw std::runtime_error("the upstream connection is now encrypted");
    } catch (const std::exception& e) {
      opened.reset();
      failure = e.what();
    }
    asio::post(loop, [weak, opened = std::move(opened), failure = std::move(failure)]() mutable {
      if (auto self = weak.lock()) self->reconnected(std::move(opened), failure);
    });
  });
}

void WireConnection::State::reconnected(std::optional<OpenedUpstream> opened, const std::string& failure) {
  if (closing) return;
  std::string why = failure;
  std::optional<UpstreamInfo> info;
  if (why.empty()) {
    try {
      info = opened->info;
      adopt(std::move(*opened));
    } catch (const std::exception& e) {
      why = e.what();
    }
  }
  if (!why.empty()) {
    reconnector.failed(why);
    schedule_reconnect();
    return;
  }
  reconnector.succeeded();
  state_changed(index, std::move(info));
}

WireConnection::WireConnection(asio::io_context& loop, size_t index, OpenedUpstream opened,
                               const UpstreamTarget& target, UpstreamOptions options, Finished finished,
                               StateChanged state_changed)
    : state_(std::make_shared<State>(loop, index, target, options, std::move(finished), std::move(state_changed))) {
  state_->adopt(std::move(opened));
}

WireConnection::~WireConnection() {
  State& s = *state_;
  s.closing = true;
  try {
    s.reconnect_timer.cancel();
    s.timeout_timer.cancel();
    s.lost(ESHUTDOWN, {});  // what is in flight reaches its waiters, failed
  } catch (...) {
    // Only allocation can fail here; nothing more can be done in a destructor.
  }
  if (s.connector.joinable()) s.connector.join();
}

void WireConnection::submit(std::unique_ptr<UpstreamCommand> command) {
  state_->submit(std::move(command));
}

bool WireConnection::splices() const {
  return state_->splicing;
}

void WireConnection::disconnect() {
  State& s = *state_;
  s.closing = true;
  s.reconnect_timer.cancel();
  if (!s.up) return;
  s.disconnect_wanted = true;
  s.post_write();  // NBD_CMD_DISC after what is queued; upstream answers what is in flight, then closes
}

bool WireConnection::usable(const OpenedUpstream& opened) {
  // bscache negotiates only on plain sockets; libnbd may have negotiated TLS.
  return opened.negotiated_by_bscache || nbd_get_tls_negotiated(opened.handle.get()) != 1;
}

}  // namespace bscache::proxy
