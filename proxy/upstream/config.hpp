// What the upstream wing is configured with: where upstream is and how to
// reach it, and how its connections behave. Plain data (from the command
// line), apart from the classes that use it.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace bscache::proxy {

// TLS to upstream beyond what the URI says (nbds:// turns it on; libnbd 1.14
// URIs carry only tls-certificates and tls-psk-file).
struct UpstreamTls {
  std::string certificates_dir;
  std::string psk_file;
  std::string username;
  bool verify_peer = true;  // libnbd's default
  bool any() const { return !certificates_dir.empty() || !psk_file.empty() || !username.empty(); }
};

// How to reach the upstream server.
struct UpstreamTarget {
  std::string uri;                   // any libnbd URI, or empty when command is set
  std::vector<std::string> command;  // started once by UpstreamChild, then reached by its uri
  std::string export_name;           // overrides the URI's export when set
  bool export_name_set = false;
  UpstreamTls tls;
};

struct UpstreamOptions {
  // Reconnect (with backoff from 100 ms to 5 s) when a connection dies. Default: on.
  bool reconnect = true;
  // A command unanswered this long drops its connection (then reconnect). Default: 0, off.
  std::chrono::milliseconds timeout{0};
  // Upstream connections when upstream advertises CAN_MULTI_CONN (else 1). Default: 4.
  unsigned connections = 4;
  // Wire (default): with more than one connection to a plain (not TLS)
  // upstream, the second half carry READ, CACHE and WRITEs in pipes through
  // bscache's own client (WireConnection), which splices their data.
  // Libnbd: every connection through libnbd.
  enum class DataPath : uint8_t { Libnbd, Wire };
  DataPath data_path = DataPath::Wire;
};

}  // namespace bscache::proxy
