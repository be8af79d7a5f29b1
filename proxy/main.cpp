// bscache: a caching block-status proxy for NBD.
#include <sys/resource.h>
#include <unistd.h>

#include <csignal>
#include <iostream>

#include "proxy/app.hpp"
#include "proxy/ops/logging.hpp"
#include "proxy/options.hpp"
#include "proxy/server/server.hpp"

int main(int argc, char* argv[]) {
  // First, before anything can take time: --exit-with-parent compares it
  // with getppid() once it has asked for the signal.
  const pid_t parent = getppid();
  auto parsed = bscache::proxy::parse_options(argc, argv, bscache::proxy::socket_activated());
  if (!parsed.options) {
    (parsed.exit_code == 0 ? std::cout : std::cerr) << parsed.message << '\n';
    return parsed.exit_code;
  }
  bscache::proxy::setup_logging(parsed.options->log_level, parsed.options->log_format);
  // A client vanishing mid-write must not kill the process.
  std::signal(SIGPIPE, SIG_IGN);
  // Every client is a descriptor: allow as many as the hard limit does.
  if (rlimit files{}; getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur < files.rlim_max) {
    files.rlim_cur = files.rlim_max;
    setrlimit(RLIMIT_NOFILE, &files);
  }
  return bscache::proxy::run_bscache(*parsed.options, parent);
}
