// The bscache process: wires options to the upstream, the cache, the
// listeners and the reporting, runs the loop, and shuts down cleanly.
#pragma once

#include <sys/types.h>

#include "proxy/options.hpp"

namespace bscache::proxy {

// Returns the process exit status (the --run command's, when given).
// `parent`: getppid() as early as main() could take it (--exit-with-parent).
int run_bscache(const Options& options, pid_t parent);

}  // namespace bscache::proxy
