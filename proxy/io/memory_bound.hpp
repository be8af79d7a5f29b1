// The default bound on what all clients together may hold, apart from
// ClientMemory so that option structs can name it without Asio.
#pragma once

#include <cstddef>

namespace bscache::proxy {

// A quarter of the machine's physical memory, at least 256 MiB: the default
// of --max-client-memory.
size_t default_client_memory();

}  // namespace bscache::proxy
