// What each command does: validated requests arrive here, one function each.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>

#include "policy/alignment.hpp"
#include "policy/fetch_window.hpp"
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
      case kCmdBlockStatus: co_await serve_block_status(request); break;
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
  auto& head = reply.head();
  const ReplyForm form = reply_form(request);
  auto& chunks = result.chunks;
  const bool holes = std::any_of(chunks.begin(), chunks.end(), [](const ReadChunk& c) { return c.hole; });
  if (!negotiated_.structured_replies || !holes) {
    // One piece of data (libnbd zero-fills holes in the buffer for a simple reply).
    if (negotiated_.structured_replies) {
      encode_offset_data_header(head, request.cookie, true, request.offset, request.length, form);
    } else {
      encode_simple_reply(head, request.cookie, 0);
    }
    reply.add_head_piece(0);
    reply.add_payload_piece(0, request.length);
  } else {
    std::sort(chunks.begin(), chunks.end(), [](const ReadChunk& a, const ReadChunk& b) { return a.offset < b.offset; });
    for (size_t i = 0; i < chunks.size(); ++i) {
      const auto& c = chunks[i];
      const bool done = i + 1 == chunks.size();
      const size_t from = head.size();
      if (c.hole) {
        encode_offset_hole(head, request.cookie, done, c.offset, c.length, form);
        reply.add_head_piece(from);
      } else {
        encode_offset_data_header(head, request.cookie, done, c.offset, c.length, form);
        reply.add_head_piece(from);
        reply.add_payload_piece(c.offset - request.offset, c.length);
      }
    }
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
  auto& head = reply.head();
  const ReplyForm form = reply_form(request);
  size_t in_pipes = 0;  // data bytes so far: where the next chunk's data starts
  for (size_t i = 0; i < result.chunks.size(); ++i) {
    const auto& c = result.chunks[i];
    const bool done = i + 1 == result.chunks.size();
    const size_t from = head.size();
    if (c.hole) {
      encode_offset_hole(head, request.cookie, done, c.offset, c.length, form);
      reply.add_head_piece(from);
      continue;
    }
    encode_offset_data_header(head, request.cookie, done, c.offset, c.length, form);
    reply.add_head_piece(from);
    for (const size_t end = in_pipes + c.length; in_pipes < end;) {  // the chunk's data, pipe by pipe
      const auto share = PipePool::share_at(in_pipes, end);
      reply.add_pipe_piece(share.index, share.bytes);
      in_pipes += share.bytes;
    }
  }
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
  if (args.length > kUpstreamCommandPiece) {  // TRIM or WRITE_ZEROES of an extended-headers client
    result = co_await run_in_pieces(args);
  } else {
    result = co_await upstream_->run(args, cancelled_);
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
  CommandResult result;
  if (args.length > kUpstreamCommandPiece) {
    result = co_await run_in_pieces(args);
  } else {
    result = co_await upstream_->run(args, cancelled_);
  }
  reply_result(request, result.error);
}

bool Session::try_block_status_hit(const RequestHeader& request) {
  if (!only_base_allocation(request)) return false;
  if (!block_status_->try_answer(request.offset, request.length, request.flags & kCmdFlagReqOne, descriptors_)) {
    return false;
  }
  ++metrics_->block_status_hits;
  reply_base_allocation(request, descriptors_);
  return true;
}

namespace {
// The query upstream is asked: the client's, or for an unaligned query of a
// client that did not agree to upstream's block size, the whole blocks
// around it without REQ_ONE (whose one extent might end before the query
// starts), at most 4 GiB - 1 long. The answer is then cut back to the
// client's range (cut_descriptors).
RequestHeader block_status_asked(const RequestHeader& request, uint32_t align, uint64_t export_size) {
  if (policy::is_aligned({request.offset, request.length}, align, export_size)) return request;
  RequestHeader asked = request;
  const auto blocks = policy::widen({request.offset, request.length}, align, export_size);
  asked.offset = blocks.offset;
  asked.length = std::min<uint64_t>(blocks.length, policy::kMaxRequestLength / align * align);
  asked.flags &= ~kCmdFlagReqOne;
  return asked;
}
}  // namespace

awaitable<void> Session::serve_block_status(const RequestHeader& request) {
  ++metrics_->block_status_misses;
  const RequestHeader asked = block_status_asked(request, align_, info_.size);
  if (!only_base_allocation(request) || !block_status_->caching()) {
    co_await serve_passthrough_block_status(request, asked);
    co_return;
  }
  std::vector<Descriptor> descriptors;
  int error =
      co_await block_status_->answer_after_miss(asked.offset, asked.length, asked.flags & kCmdFlagReqOne, descriptors);
  if (error) {
    reply_result(request, error);
  } else if (asked.offset != request.offset || asked.length != request.length) {
    std::vector<Descriptor> cut;
    cut_descriptors(descriptors, request.offset - asked.offset, request.length, request.flags & kCmdFlagReqOne, cut);
    reply_base_allocation(request, cut);
  } else {
    reply_base_allocation(request, descriptors);
  }
}

// Contexts other than base:allocation are never cached: ask upstream and
// translate its per-context answer to this client's context ids (those its
// filter names, if it sent one). A query longer than upstream takes in one
// request (an extended-headers client's) is answered for what that covers.
awaitable<void> Session::serve_passthrough_block_status(const RequestHeader& request, const RequestHeader& asked) {
  const bool req_one = request.flags & kCmdFlagReqOne;
  const uint64_t block = std::max<uint32_t>(info_.min_block, 1);
  const uint64_t asked_length = std::min(asked.length, policy::kMaxRequestLength / block * block);
  auto result =
      co_await upstream_->block_status(asked.offset, asked_length, {.req_one = (asked.flags & kCmdFlagReqOne) != 0});
  if (result.error) {
    reply_result(request, result.error);
    co_return;
  }
  Bytes out;
  std::vector<Descriptor> clipped;
  const ReplyForm form = reply_form(request);
  const auto wanted = [&](size_t i) { return request.context_mask == 0 || ((request.context_mask >> i) & 1) != 0; };
  size_t last = negotiated_.contexts.size();  // one past the last context answered: its chunk ends the reply
  while (last > 0 && !wanted(last - 1)) --last;
  for (size_t i = 0; i < last; ++i) {
    if (!wanted(i)) continue;
    const uint32_t context = negotiated_.contexts[i];
    clipped.clear();
    if (info_.upstream_context(context)) {
      if (const auto* descriptors = result.extents_for(info_.contexts[context])) {
        cut_descriptors(*descriptors, request.offset - asked.offset, request.length, req_one, clipped);
      }
    } else {
      clipped.push_back({request.length, 0});  // base:allocation synthesized: all data
    }
    if (clipped.empty()) {
      reply_error(request, kErrIo, "upstream sent no extents for a selected context");
      co_return;
    }
    encode_block_status_chunk(out, request.cookie, i + 1 == last, context + 1, clipped, form);
  }
  writer_.send(head_only(std::move(out)));
}

void Session::reply_base_allocation(const RequestHeader& request, std::span<const Descriptor> descriptors) {
  Bytes out;
  const ReplyForm form = reply_form(request);
  out.reserve(form.extended ? kExtendedReplyHeaderSize + 8 + 16 * descriptors.size()
                            : kStructuredHeaderSize + 4 + 8 * descriptors.size());
  encode_block_status_chunk(out, request.cookie, true, static_cast<uint32_t>(info_.base_allocation) + 1, descriptors,
                            form);
  writer_.send(head_only(std::move(out)));
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
