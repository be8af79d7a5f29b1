// FetchWindow: how much to ask upstream for on a block-status miss.
#pragma once

#include <cstdint>

namespace bscache::policy {

// The largest length a 32-bit NBD request can carry: the longest request
// upstream takes unless the connection says more (extended headers).
inline constexpr uint64_t kMaxRequestLength = 0xffffffffu;

struct FetchWindow {
  uint64_t offset = 0;
  uint64_t length = 0;  // 0 only when offset >= export_size
  bool operator==(const FetchWindow&) const = default;
};

// The window that starts at `offset` rounded down to `min_block`, is at most
// `max_window` long (itself capped to `request_limit`, the longest request the
// upstream connection can send, and rounded down to `min_block`), and ends no
// later than `export_size`. `min_block` 0 means 1.
// Unless it ends at `export_size`, its end is rounded down to a multiple of
// `end_align` (upstream's allocation unit) where that still leaves `offset`
// inside it and `end_align` is a multiple of the block: a window ending
// mid-unit cuts the extent there short, and a client then asks again for the
// rest of it at an odd offset.
FetchWindow plan_fetch(uint64_t offset, uint64_t export_size, uint32_t min_block,
                       uint64_t max_window = kMaxRequestLength, uint64_t end_align = 1,
                       uint64_t request_limit = kMaxRequestLength);

// The window a miss fetches: `planned`, or, for a query without REQ_ONE that
// reaches past its end, exactly the query's range. Such a client wants every
// extent in its range: one upstream call of the client's own shape answers it
// in one reply, as direct access would, where windows sized for the cache
// would split it into several round trips. A query longer than one request
// upstream can carry (`request_limit`, as for plan_fetch: an extended-headers
// client's, when upstream has none) gets `planned`: its reply covers less
// than it asked, which the spec allows.
FetchWindow window_for_miss(uint64_t offset, uint64_t length, bool req_one, FetchWindow planned,
                            uint64_t request_limit = kMaxRequestLength);

}  // namespace bscache::policy
