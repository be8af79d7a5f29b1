#include "proxy/wire/errors.hpp"

#include <cerrno>

#include "proxy/wire/protocol.hpp"

namespace bscache::proxy {

uint32_t nbd_error_from_errno(int error) {
  switch (error) {
    case 0: return 0;
    case EPERM:
    case EROFS: return wire::kErrPerm;
    case EIO: return wire::kErrIo;
    case ENOMEM: return wire::kErrNoMem;
    case EINVAL:
    case ERANGE: return wire::kErrInval;
    case ENOSPC:
    case EDQUOT:
    case EFBIG: return wire::kErrNoSpc;
    case EOVERFLOW: return wire::kErrOverflow;
    case ENOTSUP: return wire::kErrNotSup;
    case ESHUTDOWN:
    case ENOTCONN:
    case ECONNRESET:
    case EPIPE: return wire::kErrShutdown;
    default: return wire::kErrIo;
  }
}

int errno_from_nbd(uint32_t error) {
  switch (error) {
    case 0: return 0;
    case wire::kErrPerm: return EPERM;
    case wire::kErrIo: return EIO;
    case wire::kErrNoMem: return ENOMEM;
    case wire::kErrInval: return EINVAL;
    case wire::kErrNoSpc: return ENOSPC;
    case wire::kErrOverflow: return EOVERFLOW;
    case wire::kErrNotSup: return ENOTSUP;
    case wire::kErrShutdown: return ESHUTDOWN;
    default: return EINVAL;
  }
}

}  // namespace bscache::proxy
