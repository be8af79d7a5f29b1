// What bscache asks of its upstream and what comes back: plain data, no
// libnbd. libnbd stays inside proxy/upstream/connect.cpp (opening a
// connection) and proxy/upstream/libnbd_connection.cpp.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "proxy/wire/codec.hpp"
#include "proxy/wire/command_flags.hpp"

namespace bscache::proxy {

enum class UpstreamOp : uint8_t { Read, Write, Flush, Trim, Zero, Cache, BlockStatus };

// The NBD command number of an op, for per-op counters and logs.
uint16_t wire_command(UpstreamOp op);

using wire::CommandFlags;

using wire::ReadChunk;

struct CommandResult {
  int error = 0;  // errno from upstream or libnbd; 0 on success
  // BLOCK_STATUS: descriptors per meta context the answering connection
  // negotiated, named by `contexts` (a reconnect may have changed them).
  std::vector<std::vector<wire::Descriptor>> extents;
  std::shared_ptr<const std::vector<std::string>> contexts;
  std::vector<ReadChunk> chunks;  // READ: the pieces upstream sent, in order received
  // READ or WRITE through pipes: no connection that splices was up (or a
  // READ's pipe overflowed); the caller should use a buffer instead.
  bool needs_buffer = false;
  // TRIM, WRITE_ZEROES or CACHE longer than a compact request carries (4 GiB
  // - 1): no connection up negotiated extended headers, and nothing was
  // sent; the caller sends it in pieces instead.
  bool needs_pieces = false;

  static CommandResult failed(int error) {
    CommandResult r;
    r.error = error;
    return r;
  }

  // BLOCK_STATUS: upstream's descriptors for one context; null if it sent none.
  const std::vector<wire::Descriptor>* extents_for(std::string_view context) const {
    if (!contexts) return nullptr;
    for (size_t i = 0; i < contexts->size() && i < extents.size(); ++i) {
      if ((*contexts)[i] == context) return &extents[i];
    }
    return nullptr;
  }
};

// One command for upstream. `buffer` is READ's destination or WRITE's source;
// it must stay valid until the command completes.
struct CommandArgs {
  UpstreamOp op = UpstreamOp::Flush;
  std::span<uint8_t> buffer;
  uint64_t offset = 0;
  uint64_t length = 0;  // READ/WRITE: buffer.size(), unless the data is in `pipes`
  CommandFlags flags;
  // READ or WRITE without a buffer: the data is in pipes from
  // PipePool::acquire_for (see PipePool::share_at for which byte is in
  // which). READ: their write ends, empty; the data is spliced
  // into them in the order upstream sends it, and `chunks` says what it is.
  // WRITE: their read ends, holding the payload, spliced into the upstream
  // socket. Only WireConnection does this (splices()).
  std::span<const int> pipes = {};
};

}  // namespace bscache::proxy
