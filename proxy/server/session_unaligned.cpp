// Requests of a client that did not agree to upstream's minimum block size
// (it did not ask for NBD_INFO_BLOCK_SIZE in GO, or used EXPORT_NAME). It was
// offered minimum 1, as the spec's default and qemu-nbd do, so it may send
// requests of any alignment; upstream (which bscache's connections did agree
// to) refuses those. So they go upstream as whole blocks: READ reads the
// blocks and answers the bytes asked for; WRITE and WRITE_ZEROES
// read-modify-write the blocks at their edges; TRIM trims the whole blocks
// inside it (and CACHE widens: see session_commands.cpp; BLOCK_STATUS too: see
// BlockStatusService).
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstring>

#include "policy/alignment.hpp"
#include "proxy/server/read_reply.hpp"
#include "proxy/server/session.hpp"

namespace bscache::proxy {

using namespace wire;

bool Session::unaligned(const RequestHeader& request) const {
  return align_ > 1 && !policy::is_aligned({request.offset, request.length}, align_, info_.size);
}

// In pieces of at most upstream's maximum block size: widening may take a
// READ of the largest size past it.
awaitable<int> Session::read_whole(uint64_t offset, std::span<uint8_t> into) {
  const size_t most = std::max<size_t>(info_.max_block / align_ * align_, align_);
  for (size_t done = 0; done < into.size();) {
    const auto piece = into.subspan(done, std::min(most, into.size() - done));
    const uint64_t at = offset + done;
    auto result = co_await upstream_->run(
        {.op = UpstreamOp::Read, .buffer = piece, .offset = at, .length = piece.size(), .flags = {}}, cancelled_);
    if (result.error) co_return result.error;
    // A hole's bytes are zeroes, whatever the buffer held before.
    for (const auto& c : result.chunks) {
      if (c.hole) std::memset(piece.data() + (c.offset - at), 0, c.length);
    }
    done += piece.size();
  }
  co_return 0;
}

// The blocks are read into a buffer; the reply is the bytes asked for, as one
// piece of data (a hole among them is zeroes in it, which a reader may always be sent).
awaitable<void> Session::serve_unaligned_read(const RequestHeader& request) {
  const auto blocks = policy::widen({request.offset, request.length}, align_, info_.size);
  PooledBuffer buffer = ctx_.buffers.acquire(blocks.length);
  const int error = co_await read_whole(blocks.offset, buffer.span());
  if (error) {
    reply_result(request, error);
    co_return;
  }
  Reply reply;
  add_read_data(reply, request, negotiated_.structured_replies, reply_form(request), request.offset - blocks.offset);
  reply.set_payload(std::move(buffer));
  writer_.send(std::move(reply));
}

// Read-modify-write: the blocks at the range's edges are read, patched with
// the client's bytes (or zeroes) and written back whole; the whole blocks
// between go as the client sent them (a WRITE of its data, or a
// WRITE_ZEROES with its flags). The blocks are held alone meanwhile (the
// export's WriteGate), so no other write to them can land between the read
// and the write and be undone; FUA applies to every piece. The cache forgets
// the whole blocks, as for any mutation.
awaitable<void> Session::serve_unaligned_write(const RequestHeader& request, WritePayload payload) {
  const bool zeroes = request.type == kCmdWriteZeroes;
  if (zeroes && (request.flags & kCmdFlagFastZero)) {
    // Its edges would be written, not zeroed: not fast. The spec lets the
    // server refuse a fast zero it cannot do fast.
    reply_error(request, kErrNotSup, "unaligned fast zero: the edge blocks would have to be written");
    co_return;
  }
  const auto plan = policy::plan_edges({request.offset, request.length}, align_, info_.size);
  const auto hold = co_await (**export_).write_gate().enter(plan.whole.offset, plan.whole.length, true);

  std::span<uint8_t> data;  // WRITE: the client's bytes, in a buffer
  if (!zeroes) {
    if (!payload.pipes.empty()) {
      payload.buffer = ctx_.buffers.acquire(request.length);
      if (!PipePool::copy_out(payload.pipes, payload.buffer.span())) {
        reply_result(request, EIO);
        co_return;
      }
    }
    data = payload.buffer.span();
  }
  const CommandFlags fua = CommandFlags::from_wire(request.flags & kCmdFlagFua);
  auto ticket = block_status_->begin_mutation(plan.whole.offset, plan.whole.length);
  const auto aliased = ctx_.exports.begin_aliased_write(**export_);

  int error = 0;
  for (const auto& edge : {plan.head, plan.tail}) {
    if (!edge || error) continue;
    PooledBuffer block = ctx_.buffers.acquire(edge->length);
    error = co_await read_whole(edge->offset, block.span());
    if (error) break;
    // The part of the client's range inside this block.
    const uint64_t from = std::max(edge->offset, request.offset);
    const uint64_t to = std::min(edge->end(), request.offset + request.length);
    uint8_t* patch = block.span().data() + (from - edge->offset);
    if (zeroes) {
      std::memset(patch, 0, to - from);
    } else {
      std::memcpy(patch, data.data() + (from - request.offset), to - from);
    }
    auto written = co_await upstream_->run(
        {.op = UpstreamOp::Write, .buffer = block.span(), .offset = edge->offset, .length = edge->length, .flags = fua},
        cancelled_);
    error = written.error;
  }
  if (!error && plan.middle) {
    const auto& middle = *plan.middle;
    CommandArgs args{.op = zeroes ? UpstreamOp::Zero : UpstreamOp::Write,
                     .buffer = {},
                     .offset = middle.offset,
                     .length = middle.length,
                     .flags = zeroes ? CommandFlags::from_wire(request.flags & (kCmdFlagFua | kCmdFlagNoHole)) : fua};
    if (!zeroes) args.buffer = data.subspan(middle.offset - request.offset, middle.length);
    error = zeroes ? (co_await run_whole_or_in_pieces(args)).error : (co_await upstream_->run(args, cancelled_)).error;
  }
  // The blocks are left as a WRITE leaves them (state 0, safe for any range),
  // a WRITE_ZEROES' too: its edge blocks were written, not zeroed.
  block_status_->end_mutation(ticket, plan.whole.offset, plan.whole.length, policy::Mutation::Write, error == 0);
  if (error) spdlog::debug("connection {}: read-modify-write of {}+{} failed", id_, request.offset, request.length);
  reply_result(request, error);
}

}  // namespace bscache::proxy
