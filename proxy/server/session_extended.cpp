// What extended headers (NBD_OPT_EXTENDED_HEADERS) add to a session: payloads
// on commands other than WRITE (BLOCK_STATUS's context filter, which the
// block-status service applies), and TRIM, WRITE_ZEROES and CACHE longer than
// upstream's 32-bit requests carry (libnbd 1.14, or an upstream without
// extended headers), sent in pieces. The extended replies themselves are
// framed where each reply is encoded (Session::reply_form, BlockStatusClient).
#include <spdlog/spdlog.h>

#include <algorithm>

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
