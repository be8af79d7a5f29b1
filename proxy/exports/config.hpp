// What the exports wing is configured with: the block-status cache, how
// each export is opened, and which exports are served. Plain data (from the
// command line), apart from the classes that use it.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>

#include "cache/limits.hpp"
#include "policy/coherence.hpp"
#include "policy/prefetch.hpp"
#include "proxy/upstream/config.hpp"

namespace bscache::proxy {

struct BlockStatusConfig {
  policy::CoherencePolicy coherence;
  policy::PrefetchConfig prefetch;
  cache::CacheLimits limits;
  // Longest window asked for on a miss. Default: no limit but upstream's
  // (ExportInfo::max_block_status_length: 4 GiB - 1 without extended headers).
  uint64_t max_window = UINT64_MAX;
  // Most descriptors in one reply without REQ_ONE. Default: 65536.
  size_t max_descriptors = 65536;
};

// What every export is opened with (from the command line).
struct ExportSettings {
  UpstreamOptions upstream;
  BlockStatusConfig block_status;
  bool read_only = false;
};

enum class ExportsMode { Single, Passthrough };

struct ExportLimits {
  ExportsMode mode = ExportsMode::Single;
  // Exports open at once (passthrough). Default: 64.
  size_t max_exports = 64;
  // An export with no clients this long is closed (passthrough). Default: 60 s.
  std::chrono::milliseconds idle_timeout{60'000};
};

}  // namespace bscache::proxy
