// What each command does: validated requests arrive here, one function each.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>

#include "policy/alignment.hpp"
#include "proxy/server/read_reply.hpp"
#include "proxy/server/session.hpp"
#include "proxy/wire/errors.hpp"

namespace bscache::proxy {

using namespace wire;

namespace {
constexpr uint16_t kMutationFlags = kCmdFlagFua | kCmdFlagNoHole | kCmdFlagFastZero;
}  // namespace

awaitable<void> Session::serve(RequestHeader request, WritePayload payload, size_t held) {
  auto self = shared_from_this();
  try {
    const bool whole_blocks = !unaligned(request);
    switch (request.type) {
      case kCmdRead:
        if (whole_blocks) {
          co_await serve_read(request);
        } else {
          co_await serve_unaligned_read(request);
        }
        break;
      case kCmdWrite:
      case kCmdWriteZeroes:
        if (whole_blocks) {
          co_await serve_mutation(request, std::move(payload));
        } else {
          co_await serve_unaligned_write(request, std::move(payload));
        }
        break;
      case kCmdTrim: co_await serve_mutation(request, std::move(payload)); break;
      case kCmdFlush: reply_result(request, (co_await upstream_->flush(CommandFlags::from_wire(0))).error); break;
      case kCmdCache: co_await serve_cache(request); break;
      case kCmdBlockStatus:
        reply_block_status(request, co_await block_status_->answer(block_status_client_, request));
        break;
      default: reply_error(request, kErrInval, "unknown command");
    }
  } catch (const std::exception& e) {
    spdlog::error("connection {}: {} failed: {}", id_, command_name(request.type), e.what());
    reply_error(request, kErrIo, e.what());
  }
  request_done(held);
}

// Upstream reads into a pipe (serve_spliced_read) or, where that cannot be,
// into a pooled buffer; the reply is sent from it, headers in front by a
// gathered write, holes passed on as OFFSET_HOLE chunks.
awaitable<void> Session::serve_read(const RequestHeader& request) {
  if (splice_reads_) {
    const bool spliced = co_await serve_spliced_read(request);
    if (spliced) co_return;
  }
  PooledBuffer buffer = ctx_.buffers.acquire(request.length);
  auto result = co_await upstream_->run({.op = UpstreamOp::Read,
                                         .buffer = buffer.span(),
                                         .offset = request.offset,
                                         .length = request.length,
                                         .flags = CommandFlags::from_wire(request.flags & kCmdFlagDf)},
                                        cancelled_);
  if (result.error) {
    reply_result(request, result.error);
    co_return;
  }
  Reply reply;
  const ReplyForm form = reply_form(request);
  auto& chunks = result.chunks;
  const bool holes = std::any_of(chunks.begin(), chunks.end(), [](const ReadChunk& c) { return c.hole; });
  if (!negotiated_.structured_replies || !holes) {
    // One piece of data (libnbd zero-fills holes in the buffer for a simple reply).
    add_read_data(reply, request, negotiated_.structured_replies, form, 0);
  } else {
    std::sort(chunks.begin(), chunks.end(), [](const ReadChunk& a, const ReadChunk& b) { return a.offset < b.offset; });
    add_read_chunks(reply, request.cookie, chunks, form,
                    [&](const ReadChunk& c) { reply.add_payload_piece(c.offset - request.offset, c.length); });
  }
  // A reply of holes only sends none of the buffer: give it back now.
  if (reply.has_payload_pieces()) reply.set_payload(std::move(buffer));
  writer_.send(std::move(reply));
}

// The data goes from the upstream socket into pipes and from the pipes into
// the client's socket (see PipePool), chunk for chunk as upstream sent it.
// False if it could not (a pipe refused, no connection that splices, a pipe
// that overflowed): nothing was sent to the client; read into a buffer.
awaitable<bool> Session::serve_spliced_read(const RequestHeader& request) {
  const size_t length = request.length;
  if (length > PipePool::kMaxPayload || !upstream_->splices()) co_return false;
  std::vector<PooledPipe> pipes = ctx_.pipes->acquire_for(length);
  if (pipes.empty()) co_return false;
  const std::vector<int> sinks = write_ends(pipes);
  auto result = co_await upstream_->run({.op = UpstreamOp::Read,
                                         .buffer = {},
                                         .offset = request.offset,
                                         .length = length,
                                         .flags = CommandFlags::from_wire(request.flags & kCmdFlagDf),
                                         .pipes = sinks},
                                        cancelled_);
  if (result.needs_buffer) co_return false;
  if (result.error || result.chunks.empty()) {
    reply_result(request, result.error ? result.error : EIO);
    co_return true;
  }
  Reply reply;
  size_t in_pipes = 0;  // data bytes so far: where the next chunk's data starts
  add_read_chunks(reply, request.cookie, result.chunks, reply_form(request), [&](const ReadChunk& c) {
    for (const size_t end = in_pipes + c.length; in_pipes < end;) {  // the chunk's data, pipe by pipe
      const auto share = PipePool::share_at(in_pipes, end);
      reply.add_pipe_piece(share.index, share.bytes);
      in_pipes += share.bytes;
    }
  });
  reply.set_pipes(std::move(pipes));
  ++metrics_->reads_spliced;
  writer_.send(std::move(reply));
  co_return true;
}

// The cache bracket: a mutation forgets its range when it starts and records
// what it left when it ends (see CoherentCache).
awaitable<void> Session::serve_mutation(RequestHeader request, WritePayload payload) {
  const RequestHeader asked = request;  // what the reply answers (an extended one echoes its offset)
  if (request.type == kCmdTrim && unaligned(request)) {
    // A TRIM may leave any of its range as it was: the whole blocks inside it are trimmed.
    const auto inside = policy::interior({request.offset, request.length}, align_, info_.size);
    if (!inside) {
      reply_result(request, 0);
      co_return;
    }
    request.offset = inside->offset;
    request.length = inside->length;
  }
  const auto [op, kind] = request.type == kCmdWrite  ? std::pair{UpstreamOp::Write, policy::Mutation::Write}
                          : request.type == kCmdTrim ? std::pair{UpstreamOp::Trim, policy::Mutation::Trim}
                                                     : std::pair{UpstreamOp::Zero, policy::Mutation::WriteZeroes};
  // Where some clients' writes are read-modify-writes, no write may land in
  // their blocks between their read and their write (see WriteGate).
  std::optional<WriteGate::Hold> gate;
  if (info_.min_block > 1) gate.emplace(co_await (**export_).write_gate().enter(request.offset, request.length, false));
  const std::vector<int> sources = read_ends(payload.pipes);  // a WRITE spliced into pipes leaves them by splice too
  CommandArgs args{.op = op,
                   .buffer = payload.buffer.span(),
                   .offset = request.offset,
                   .length = request.length,
                   .flags = CommandFlags::from_wire(request.flags & kMutationFlags),
                   .pipes = sources};
  // The tickets are taken in the same loop step as the co_await that hands the
  // command to the pool, so they are taken before the command can reach upstream.
  auto ticket = block_status_->begin_mutation(request.offset, request.length);
  const auto aliased = ctx_.exports.begin_aliased_write(**export_);  // released as this returns
  CommandResult result;
  if (op == UpstreamOp::Write) {
    result = co_await upstream_->run(args, cancelled_);
  } else {
    result = co_await run_whole_or_in_pieces(args);
  }
  if (result.needs_buffer) {
    // No connection splices now (nothing was sent): the data leaves the
    // pipes for a buffer, a copy, and goes like any other WRITE.
    payload.buffer = ctx_.buffers.acquire(request.length);
    args.buffer = payload.buffer.span();
    args.pipes = {};
    const bool copied = PipePool::copy_out(payload.pipes, args.buffer);
    result = copied ? co_await upstream_->run(args, cancelled_) : CommandResult::failed(EIO);
  } else if (!sources.empty()) {
    ++metrics_->writes_spliced;
  }
  block_status_->end_mutation(ticket, request.offset, request.length, kind, result.error == 0);
  reply_result(asked, result.error);
}

awaitable<void> Session::serve_cache(const RequestHeader& request) {
  // Whole blocks for upstream: CACHE is advice, and more of it does no harm.
  const auto blocks = policy::widen({request.offset, request.length}, align_, info_.size);
  const CommandArgs args{
      .op = UpstreamOp::Cache, .buffer = {}, .offset = blocks.offset, .length = blocks.length, .flags = {}};
  const CommandResult result = co_await run_whole_or_in_pieces(args);
  reply_result(request, result.error);
}

void Session::reply_block_status(const RequestHeader& request, BlockStatusReply reply) {
  if (!reply.error) {
    writer_.send(head_only(std::move(reply.chunks)));
  } else if (!reply.message.empty()) {
    reply_error(request, nbd_error_from_errno(reply.error), reply.message);
  } else {
    reply_result(request, reply.error);
  }
}

void Session::reply_result(const RequestHeader& request, int error) {
  if (error) {
    reply_error(request, nbd_error_from_errno(error), strerror(error));
    return;
  }
  Bytes out;
  if (negotiated_.structured_replies) {
    encode_done(out, request.cookie, reply_form(request));
  } else {
    encode_simple_reply(out, request.cookie, 0);
  }
  writer_.send(head_only(std::move(out)));
}

// The one place a client error is sent, and so the one place it is counted.
void Session::reply_error(const RequestHeader& request, uint32_t nbd_error, std::string_view message) {
  if (request.type < kOpCount) ++metrics_->client_errors[request.type];
  spdlog::debug("connection {}: {} at {}+{} fails: {}", id_, command_name(request.type), request.offset, request.length,
                message);
  Bytes out;
  if (negotiated_.structured_replies) {
    encode_error_chunk(out, request.cookie, true, nbd_error, message, reply_form(request));
  } else {
    encode_simple_reply(out, request.cookie, nbd_error);
  }
  writer_.send(head_only(std::move(out)));
}

}  // namespace bscache::proxy
