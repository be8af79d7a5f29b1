// A command's flags as bscache passes them upstream, and the one mapping to
// and from the NBD wire bits (NBD_CMD_FLAG_*). libnbd's LIBNBD_CMD_FLAG_* are
// the same bits (checked at compile time where libnbd is used), so this is
// also what a libnbd call is given.
#pragma once

#include <cstdint>

namespace bscache::wire {

struct CommandFlags {
  bool fua = false;        // WRITE, TRIM, WRITE_ZEROES: durable before the reply
  bool no_hole = false;    // WRITE_ZEROES: do not punch a hole
  bool fast_zero = false;  // WRITE_ZEROES: fail rather than write zeroes slowly
  bool df = false;         // READ: do not fragment the reply
  bool req_one = false;    // BLOCK_STATUS: one descriptor is enough

  // From a request's NBD flag bits; bits without a meaning upstream are dropped.
  static CommandFlags from_wire(uint16_t flags);
  // The NBD flag bits of these flags.
  uint16_t to_wire() const;

  bool operator==(const CommandFlags&) const = default;
};

}  // namespace bscache::wire
