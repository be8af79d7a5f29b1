// The one mapping between errno values (upstream or local) and NBD error
// codes, one function each way.
#pragma once

#include <cstdint>

namespace bscache::proxy {

// Errors the protocol has a name for pass through; anything else becomes EIO
// (the spec's catch-all) rather than leaking a platform-specific number.
uint32_t nbd_error_from_errno(int error);
// An NBD error code upstream replied with, as an errno value. A code the
// protocol does not name becomes EINVAL (the spec's advice to clients).
int errno_from_nbd(uint32_t error);

}  // namespace bscache::proxy
