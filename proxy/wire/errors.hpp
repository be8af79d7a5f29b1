// The one mapping from errno values (upstream or local) to NBD error codes.
#pragma once

#include <cstdint>

namespace bscache::proxy {

// Errors the protocol has a name for pass through; anything else becomes EIO
// (the spec's catch-all) rather than leaking a platform-specific number.
uint32_t nbd_error_from_errno(int error);

}  // namespace bscache::proxy
