#include "proxy/wire/command_flags.hpp"

#include "proxy/wire/protocol.hpp"

namespace bscache::wire {

CommandFlags CommandFlags::from_wire(uint16_t flags) {
  return {.fua = (flags & kCmdFlagFua) != 0,
          .no_hole = (flags & kCmdFlagNoHole) != 0,
          .fast_zero = (flags & kCmdFlagFastZero) != 0,
          .df = (flags & kCmdFlagDf) != 0,
          .req_one = (flags & kCmdFlagReqOne) != 0};
}

uint16_t CommandFlags::to_wire() const {
  uint16_t out = 0;
  if (fua) out |= kCmdFlagFua;
  if (no_hole) out |= kCmdFlagNoHole;
  if (fast_zero) out |= kCmdFlagFastZero;
  if (df) out |= kCmdFlagDf;
  if (req_one) out |= kCmdFlagReqOne;
  return out;
}

}  // namespace bscache::wire
