// What extended headers (NBD_OPT_EXTENDED_HEADERS) add to a session: payloads
// on commands other than WRITE (BLOCK_STATUS's context filter, which the
// block-status service applies), and TRIM, WRITE_ZEROES and CACHE longer than
// a compact request carries: whole to an upstream connection that negotiated
// extended headers, in pieces where none is up. The extended replies themselves are
// framed where each reply is encoded (Session::reply_form, BlockStatusClient).
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "proxy/server/session.hpp"

namespace bscache::proxy {

using namespace wire;

// The payload is read whatever the command, so the stream stays in step (the
// spec: consume it, then fail the command). A BLOCK_STATUS filter this client
// was offered (NBD_FLAG_BLOCK_STATUS_PAYLOAD) and that names known contexts
// becomes the request's context_mask (see proxy::context_mask) and effect length, and its flag is
// cleared; anything else keeps NBD_CMD_FLAG_PAYLOAD_LEN, which validation
// then refuses (EINVAL). False: the client is gone, or sent a payload longer
// than any it may (the spec's hard disconnect).
awaitable<bool> Session::read_command_payload(RequestHeader& request) {
  if (request.length > limits_.max_payload) {
    spdlog::warn("connection {}: {} with a payload of {} bytes, more than the maximum {}, closing", id_,
                 command_name(request.type), request.length, limits_.max_payload);
    co_return false;
  }
  command_payload_.resize(request.length);
  const bool complete = co_await stream_.read_exact(command_payload_);
  if (!complete) co_return false;
  if (request.type != kCmdBlockStatus || !(limits_.tx_flags & kTxBlockStatusPayload)) co_return true;
  const auto filter = decode_block_status_payload(command_payload_);
  // What the filter means for this client's contexts is the block-status service's to say.
  const auto mask = filter ? context_mask(block_status_client_, filter->context_ids) : std::nullopt;
  if (!mask) co_return true;
  request.length = filter->effect_length;
  request.flags &= static_cast<uint16_t>(~kCmdFlagPayloadLen);
  request.context_mask = *mask;
  co_return true;
}

// Whole where it fits one upstream request: the pool sends a command longer
// than 4 GiB - 1 only on a connection that negotiated extended headers, and
// says `needs_pieces` (nothing sent) when none is up. The spec lets a server
// refuse an effect length beyond its maximum payload with EOVERFLOW or EINVAL
// ("too many server resources"): such a refusal of a long command is not
// the client's answer, the pieces are (nothing of a refused command happened,
// and a half-done one leaves its range as unknown as any failure: the pieces
// then do all of it, in order).
awaitable<CommandResult> Session::run_whole_or_in_pieces(CommandArgs args) {
  CommandResult whole = co_await upstream_->run(args, cancelled_);
  if (whole.needs_pieces) co_return co_await run_in_pieces(args);
  const bool refused_as_too_long =
      args.length > kMaxCompactLength && (whole.error == EOVERFLOW || whole.error == EINVAL);
  if (!refused_as_too_long) co_return whole;
  spdlog::debug("connection {}: upstream refused {} of {} bytes in one command ({}); sending it in pieces", id_,
                command_name(wire_command(args.op)), args.length, strerror(whole.error));
  co_return co_await run_in_pieces(args);
}

// One piece at a time, in order, and one reply after the last: FUA (on every
// piece) and ordering hold as for one command; the first failure ends it
// (the rest is not sent, and the range's state is unknown, as after any
// failed command). Concurrent pieces would finish sooner, but a client that
// sent one command would then see a failure with later pieces applied.
awaitable<CommandResult> Session::run_in_pieces(CommandArgs args) {
  const uint64_t end = args.offset + args.length;
  for (uint64_t at = args.offset; at < end;) {
    CommandArgs piece = args;
    piece.offset = at;
    piece.length = std::min(end - at, kUpstreamCommandPiece);
    auto result = co_await upstream_->run(piece, cancelled_);
    if (result.error) co_return result;
    at += piece.length;
  }
  co_return CommandResult{};
}

}  // namespace bscache::proxy
