// The bscache process: wires options to the upstream, the cache, the
// listeners and the reporting, runs the loop, and shuts down cleanly.
#pragma once

#include "proxy/options.hpp"

namespace bscache::proxy {

// Returns the process exit status (the --run command's, when given).
int run_bscache(const Options& options);

}  // namespace bscache::proxy
