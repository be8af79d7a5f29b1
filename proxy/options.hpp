// Command-line options: one plain struct. The fields' own initialisers are the
// defaults; options.cpp holds the table of options that --help, parsing and
// validation all come from.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>

#include "cache/limits.hpp"
#include "proxy/exports/config.hpp"
#include "proxy/server/config.hpp"
#include "proxy/upstream/config.hpp"

namespace bscache::proxy {

struct Options {
  UpstreamTarget upstream;
  UpstreamOptions upstream_options;
  ListenConfig listen;
  SessionLimits session;
  TlsServerOptions tls;
  BlockStatusConfig block_status;
  ExportLimits exports;
  bool exports_mode_given = false;  // else chosen at start-up: single if an export is named
  // Memory the cache may take; sets block_status.limits.max_extents. Default: 256 MiB.
  uint64_t cache_max_memory = cache::kDefaultMaxMemory;
  // Most cached extents, if given (0: not given); the smaller of the two limits wins.
  size_t cache_max_extents = 0;
  std::string run;  // command started once listening
  bool read_only = false;
  // Exit as on SIGTERM when the parent process dies (PR_SET_PDEATHSIG).
  bool exit_with_parent = false;
  std::string pidfile;
  std::string log_level = "info";
  std::string log_format = "text";  // or "json": one object per line
  std::string stats_file;
  std::chrono::milliseconds stats_interval{60'000};  // 0: no periodic summary
  std::string metrics_address;                       // ADDR:PORT, empty: off
  // Exit (status 3) after this long with no upstream connection up, so that a
  // service manager restarts bscache from scratch. Default: 0, retry forever.
  std::chrono::milliseconds reconnect_max{0};
};

struct ParseResult {
  std::optional<Options> options;  // empty: exit with `exit_code` after printing `message`
  int exit_code = 0;
  std::string message;
};

// `socket_activated`: the environment passes listening sockets (LISTEN_FDS
// for this process); with no listener named they are used, as nbdkit does.
ParseResult parse_options(int argc, const char* const argv[], bool socket_activated = false);

}  // namespace bscache::proxy
