#include "proxy/options.hpp"

#include <wordexp.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <sstream>
#include <type_traits>

#include <boost/program_options.hpp>

#include "policy/capacity.hpp"
#include "proxy/config_file.hpp"

namespace bscache::proxy {

namespace po = boost::program_options;

namespace {

// Every option is one row of a table: --help, parsing and per-option
// validation all come from it, so they cannot disagree. Boost.Program_options
// stays the parser (it handles "--x=v", "-r", abbreviations, repeats and their
// error messages); every value reaches us as text, and the row's `store`
// parses, range-checks and assigns it. Defaults are not in the table: they are
// the Options structs' own member initialisers, printed through `default_text`.

// Why a value was refused ("must be on or off"), or nothing if it was stored.
using Refusal = std::optional<std::string>;
using Store = std::function<Refusal(const std::string& text, Options& options)>;

struct OptionSpec {
  const char* name;        // long name, plus ",x" for a short one (Program_options syntax)
  const char* value_name;  // shown in --help; nullptr: a switch that takes no value
  const char* help;
  std::string default_text;  // shown in --help as (=...); empty: none shown
  Store store;               // called only when the option was given; null: accepted and ignored
  // false: command line only, no config-file key. For switches that say how this
  // one process was started (-s, --exit-with-parent), which a service's file has no use for.
  bool config_key = true;
};

// Longest duration any option accepts: a week is past any sensible timeout or
// period, and far from overflowing the steady clock when added to now.
constexpr std::chrono::milliseconds kMaxDuration = std::chrono::hours(24 * 7);

// Shell-style word splitting (quotes, escapes) without running anything.
std::optional<std::vector<std::string>> split_command(const std::string& command) {
  wordexp_t words{};
  if (wordexp(command.c_str(), &words, WRDE_NOCMD | WRDE_UNDEF) != 0) return std::nullopt;
  std::vector<std::string> out(words.we_wordv, words.we_wordv + words.we_wordc);
  wordfree(&words);
  if (out.empty()) return std::nullopt;
  return out;
}

// Digits only: "-5", "+5", " 5", "5k" and values past 64 bits are refused
// rather than wrapped or truncated.
std::optional<uint64_t> parse_unsigned(std::string_view text, int base = 10) {
  uint64_t value = 0;
  const char* end = text.data() + text.size();
  auto [stop, ec] = std::from_chars(text.data(), end, value, base);
  if (text.empty() || ec != std::errc() || stop != end) return std::nullopt;
  return value;
}

std::string format_bytes(uint64_t bytes) {
  for (const auto& [shift, suffix] : {std::pair{30u, "G"}, std::pair{20u, "M"}, std::pair{10u, "K"}}) {
    if (bytes >= (uint64_t{1} << shift) && bytes % (uint64_t{1} << shift) == 0) {
      return std::to_string(bytes >> shift) + suffix;
    }
  }
  return std::to_string(bytes);
}

std::string format_duration(std::chrono::milliseconds d) {
  const auto ms = d.count();
  if (ms == 0) return "0";
  if (ms % 3'600'000 == 0) return std::to_string(ms / 3'600'000) + "h";
  if (ms % 60'000 == 0) return std::to_string(ms / 60'000) + "m";
  if (ms % 1000 == 0) return std::to_string(ms / 1000) + "s";
  return std::to_string(ms) + "ms";
}

std::string on_off(bool value) {
  return value ? "on" : "off";
}

// ---- How a row stores its value. `field` maps Options to the member set. ----

template <typename Field>
Store text(Field field) {
  return [field](const std::string& value, Options& o) -> Refusal {
    field(o) = value;
    return std::nullopt;
  };
}

template <typename Field>
Store flag(Field field) {
  return [field](const std::string&, Options& o) -> Refusal {
    field(o) = true;
    return std::nullopt;
  };
}

template <typename Field>
Store on_or_off(Field field) {
  return [field](const std::string& value, Options& o) -> Refusal {
    if (value != "on" && value != "off") return "must be on or off";
    field(o) = value == "on";
    return std::nullopt;
  };
}

// An integer in [min, max], which must fit the field's type.
template <typename Field>
Store integer(Field field, uint64_t min, uint64_t max) {
  using T = std::remove_cvref_t<std::invoke_result_t<Field, Options&>>;
  static_assert(std::is_unsigned_v<T>, "options are unsigned: a sign is a mistake to refuse, not to wrap");
  return [field, min, max](const std::string& value, Options& o) -> Refusal {
    const uint64_t limit = std::min<uint64_t>(max, std::numeric_limits<T>::max());
    auto parsed = parse_unsigned(value);
    if (!parsed || *parsed < min || *parsed > limit) {
      return "must be a whole number from " + std::to_string(min) + " to " + std::to_string(limit);
    }
    field(o) = static_cast<T>(*parsed);
    return std::nullopt;
  };
}

// A byte count ("64M") in [min, max].
template <typename Field>
Store bytes(Field field, uint64_t min, uint64_t max) {
  using T = std::remove_cvref_t<std::invoke_result_t<Field, Options&>>;
  return [field, min, max](const std::string& value, Options& o) -> Refusal {
    auto parsed = policy::parse_byte_size(value);
    if (!parsed || *parsed < min || *parsed > max) {
      return "must be a size from " + format_bytes(min) + " to " + format_bytes(max) + ", such as 64M";
    }
    field(o) = static_cast<T>(*parsed);
    return std::nullopt;
  };
}

// "250ms", "30s", "5m", "1h" (a bare number is seconds), at most kMaxDuration;
// 0 only when `zero_means` says what it means.
template <typename Field>
Store duration(Field field, const char* zero_means = nullptr) {
  return [field, zero_means](const std::string& value, Options& o) -> Refusal {
    const std::string expected = std::string("must be a duration such as 30s or 250ms, at most ") +
                                 format_duration(kMaxDuration) +
                                 (zero_means ? ", or 0 for " + std::string(zero_means) : "");
    auto parsed = policy::parse_duration(value);
    if (!parsed) return expected;
    const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(*parsed);
    if (ms > kMaxDuration || (ms.count() == 0 && (!zero_means || parsed->count() != 0))) return expected;
    field(o) = ms;
    return std::nullopt;
  };
}

std::vector<OptionSpec> option_table() {
  const Options d{};  // the defaults, shown in --help
  std::ostringstream mode;
  mode << '0' << std::oct << d.listen.socket_mode;
  // clang-format off
  return {
    {"help,h", nullptr, "show this help and exit", "", nullptr},
    {"version", nullptr, "show the version and exit", "", nullptr},
    {"upstream", "URI", "upstream NBD URI (nbd://, nbd+unix://, nbds://)", "",
     text([](Options& o) -> auto& { return o.upstream.uri; })},
    {"upstream-command", "'CMD ARGS'",
     "start this upstream server once, as a child with systemd socket activation on a private Unix socket that every "
     "upstream connection reaches; stopped at exit. E.g. 'nbdkit memory 1G'", "",
     [](const std::string& value, Options& o) -> Refusal {
       auto words = split_command(value);
       if (!words) return "must be a command line such as 'nbdkit memory 1G'";
       o.upstream.command = std::move(*words);
       return std::nullopt;
     }},
    {"reconnect", "on|off", "reconnect to upstream (backoff 100 ms to 5 s) when the connection dies",
     on_off(d.upstream_options.reconnect), on_or_off([](Options& o) -> auto& { return o.upstream_options.reconnect; })},
    {"upstream-timeout", "D",
     "drop and reconnect an upstream connection that leaves a command unanswered this long (0: off)",
     format_duration(d.upstream_options.timeout),
     duration([](Options& o) -> auto& { return o.upstream_options.timeout; }, "off")},
    // More connections than that only add threads contending for two cores' worth of copying.
    {"upstream-connections", "N", "upstream connections when upstream advertises multi-conn (else 1)",
     std::to_string(d.upstream_options.connections),
     integer([](Options& o) -> auto& { return o.upstream_options.connections; }, 1, 64)},
    {"data-path", "libnbd|wire",
     "wire: with several connections to a plain upstream, the second half carry READ, CACHE and WRITE through "
     "bscache's own NBD client on the loop, which splices their data between client and upstream without copying "
     "it; libnbd: every upstream connection through libnbd",
     "wire", [](const std::string& value, Options& o) -> Refusal {
       if (value == "libnbd") {
         o.upstream_options.data_path = UpstreamOptions::DataPath::Libnbd;
       } else if (value == "wire") {
         o.upstream_options.data_path = UpstreamOptions::DataPath::Wire;
       } else {
         return "must be libnbd or wire";
       }
       return std::nullopt;
     }},
    {"export-name", "NAME", "upstream export name (default: the URI's, else \"\")", "",
     [](const std::string& value, Options& o) -> Refusal {
       o.upstream.export_name = value;
       o.upstream.export_name_set = true;
       return std::nullopt;
     }},
    {"exports", "single|passthrough",
     "single: one upstream export, whatever name a client gives; passthrough: a client's export name selects the "
     "upstream export of that name (default: single if the URI or --export-name names an export, else passthrough)",
     "", [](const std::string& value, Options& o) -> Refusal {
       if (value == "single") {
         o.exports.mode = ExportsMode::Single;
       } else if (value == "passthrough") {
         o.exports.mode = ExportsMode::Passthrough;
       } else {
         return "must be single or passthrough";
       }
       o.exports_mode_given = true;
       return std::nullopt;
     }},
    // Each open export holds its upstream connections (a thread each) and a cache.
    {"max-exports", "N", "most upstream exports open at once (passthrough)", std::to_string(d.exports.max_exports),
     integer([](Options& o) -> auto& { return o.exports.max_exports; }, 1, 4096)},
    {"export-idle-timeout", "D", "close an export (its upstream connections and cache) this long after its last client",
     format_duration(d.exports.idle_timeout), duration([](Options& o) -> auto& { return o.exports.idle_timeout; })},
    // TLS to upstream: what an nbds:// URI cannot say in libnbd 1.14 (set on
    // every upstream handle before it connects, reconnects included).
    {"upstream-tls-certificates", "DIR", "upstream TLS: CA (and client certificate) directory, libnbd's layout", "",
     text([](Options& o) -> auto& { return o.upstream.tls.certificates_dir; })},
    {"upstream-tls-psk", "FILE", "upstream TLS: PSK file (username:hexkey lines)", "",
     text([](Options& o) -> auto& { return o.upstream.tls.psk_file; })},
    {"upstream-tls-username", "NAME", "upstream TLS: PSK username (default: the URI's user, else the login name)", "",
     text([](Options& o) -> auto& { return o.upstream.tls.username; })},
    {"upstream-tls-verify-peer", "on|off", "upstream TLS: verify the server's certificate", on_off(d.upstream.tls.verify_peer),
     on_or_off([](Options& o) -> auto& { return o.upstream.tls.verify_peer; })},
    // Short names and second spellings are nbdkit's where the meaning is the
    // same (README "Options" lists which, and why others are left out). Only
    // the first long name is a config-file key.
    {"unix,socket,U", "PATH",
     "listen on this Unix socket (also --socket, as qemu-nbd; '-': a private one in a fresh temporary directory, for --run)",
     "",
     text([](Options& o) -> auto& { return o.listen.unix_path; })},
    {"port,p", "N", "listen on this TCP port (0: any free port)", "",
     [](const std::string& value, Options& o) -> Refusal {
       auto port = parse_unsigned(value);
       if (!port || *port > 65535) return "must be a port number from 0 to 65535";
       o.listen.port = static_cast<uint16_t>(*port);
       return std::nullopt;
     }},
    {"bind,ipaddr,ip-addr,i", "ADDR", "TCP address to listen on (also --ipaddr, as nbdkit)", d.listen.bind, text([](Options& o) -> auto& { return o.listen.bind; })},
    {"systemd", nullptr, "listen on sockets passed by systemd (LISTEN_FDS)", "",
     flag([](Options& o) -> auto& { return o.listen.systemd; })},
    {"single,stdin,s", nullptr,
     "serve one client, then exit: the connected socket on stdin and stdout (as nbd_connect_command passes it), or "
     "the first connection on a socket-activation socket (nbdinfo/nbdcopy '[ CMD ]'); command line only",
     "", flag([](Options& o) -> auto& { return o.listen.single; }), false},
    {"exit-with-parent", nullptr,
     "exit cleanly (stopping --upstream-command) when the process that started bscache dies; command line only", "",
     flag([](Options& o) -> auto& { return o.exit_with_parent; }), false},
    // Accepted so nbdkit command lines work unchanged: bscache never forks.
    {"foreground,no-fork,f", nullptr, "ignored: bscache always runs in the foreground (nbdkit's -f)", "", nullptr,
     false},
    {"socket-mode", "MODE", "permissions of the Unix socket (octal)", mode.str(),
     [](const std::string& value, Options& o) -> Refusal {
       auto parsed = parse_unsigned(value, 8);
       if (!parsed || *parsed > 0777) return "must be an octal mode such as 0600";
       o.listen.socket_mode = static_cast<unsigned>(*parsed);
       return std::nullopt;
     }},
    {"run", "CMD",
     "run CMD once listening, with $uri $nbd $unixsocket $port $tls $exportname set (as nbdkit); exit with its status",
     "",
     text([](Options& o) -> auto& { return o.run; })},
    {"readonly,read-only,r", nullptr, "refuse writes (EPERM; also --read-only)", "", flag([](Options& o) -> auto& { return o.read_only; })},
    {"pidfile,pid-file,P", "PATH", "write our PID here once accepting connections (also --pid-file)", "",
     text([](Options& o) -> auto& { return o.pidfile; })},
    {"log-level", "LEVEL", "trace|debug|info|warn|error", d.log_level,
     [](const std::string& value, Options& o) -> Refusal {
       static const char* const levels[] = {"trace", "debug", "info", "warn", "error"};
       if (std::find(std::begin(levels), std::end(levels), value) == std::end(levels)) {
         return "must be trace, debug, info, warn or error";
       }
       o.log_level = value;
       return std::nullopt;
     }},
    {"policy", "P", "exclusive | ttl=DURATION | off", d.block_status.coherence.describe(),
     [](const std::string& value, Options& o) -> Refusal {
       auto coherence = policy::parse_policy(value);
       if (!coherence) return "must be exclusive, off or ttl=DURATION (e.g. ttl=30s)";
       o.block_status.coherence = *coherence;
       return std::nullopt;
     }},
    {"prefetch", "on|off", "fetch ahead of sequential scans", on_off(d.block_status.prefetch.enabled),
     on_or_off([](Options& o) -> auto& { return o.block_status.prefetch.enabled; })},
    // The cache's size: from memory by default, in extents if asked; the smaller wins.
    {"cache-max-memory", "BYTES", "memory the cache may take (K/M/G suffixes); sets the most cached extents",
     format_bytes(d.cache_max_memory),
     bytes([](Options& o) -> auto& { return o.cache_max_memory; }, uint64_t{1} << 20, uint64_t{1} << 40)},
    // A billion extents would take ~170 GB: more is a typo.
    {"cache-max-extents", "N", "most cached extents (default: what --cache-max-memory allows; the smaller wins)", "",
     integer([](Options& o) -> auto& { return o.cache_max_extents; }, 1, 1'000'000'000)},
    // At most 1 GiB: a write forgetting more than that around itself would drop most of a window.
    {"allocation-granularity", "BYTES",
     "a write forgets cached state around it rounded out to this many bytes (upstream allocation unit)",
     std::to_string(d.block_status.limits.allocation_granularity),
     integer([](Options& o) -> auto& { return o.block_status.limits.allocation_granularity; }, 1, uint64_t{1} << 30)},
    // At least 64 KiB, the largest minimum block size the NBD spec allows, so a
    // window always holds a whole block. No limit of its own by default: the
    // longest request the upstream connection can send caps every window.
    {"fetch-window", "BYTES",
     "largest block-status window asked of upstream on a miss (default: the longest request upstream takes, "
     "4294967295, or the whole export where extended headers were negotiated through libnbd >= 1.18)",
     "", integer([](Options& o) -> auto& { return o.block_status.max_window; }, uint64_t{64} * 1024, UINT64_MAX)},
    // Each connection is a descriptor; Linux allows at most ~1M per process.
    {"max-connections", "N", "most client connections at once", std::to_string(d.listen.max_connections),
     integer([](Options& o) -> auto& { return o.listen.max_connections; }, 1, 1'000'000)},
    // Each request in flight may hold a 32 MiB write payload.
    {"max-in-flight", "N", "most requests in flight per client before we stop reading from it",
     std::to_string(d.session.max_in_flight),
     integer([](Options& o) -> auto& { return o.session.max_in_flight; }, 1, 4096)},
    // At least 1 MiB so a client can have a few requests in flight; at most 16 GiB.
    {"max-reply-backlog", "BYTES",
     "bytes one client may hold (requests in flight + unread replies, as allocated) before we stop reading from it",
     format_bytes(d.session.max_backlog_bytes),
     bytes([](Options& o) -> auto& { return o.session.max_backlog_bytes; }, uint64_t{1} << 20, uint64_t{16} << 30)},
    // All clients together (see ClientMemory); at least 16 MiB, at most 1 TiB.
    {"max-client-memory", "BYTES",
     "bytes all clients together may hold; beyond half of it, a client holding anything is not read from "
     "(default: a quarter of RAM, at least 256M)",
     format_bytes(d.session.max_client_memory),
     bytes([](Options& o) -> auto& { return o.session.max_client_memory; }, uint64_t{16} << 20, uint64_t{1} << 40)},
    {"handshake-timeout", "D", "time a client has to finish the handshake", format_duration(d.session.handshake_timeout),
     duration([](Options& o) -> auto& { return o.session.handshake_timeout; })},
    {"tls", "off|on|require", "offer STARTTLS to clients (require: nothing else before it)", "off",
     [](const std::string& value, Options& o) -> Refusal {
       static const std::pair<const char*, TlsMode> modes[] = {
           {"off", TlsMode::Off}, {"on", TlsMode::On}, {"require", TlsMode::Require}};
       for (const auto& [name, mode] : modes) {
         if (value == name) {
           o.tls.mode = mode;
           return std::nullopt;
         }
       }
       return "must be off, on or require";
     }},
    {"tls-certificates", "DIR", "X.509: ca-cert.pem, server-cert.pem, server-key.pem [, ca-crl.pem]", "",
     text([](Options& o) -> auto& { return o.tls.certificates_dir; })},
    {"tls-psk", "FILE", "PSK: username:hexkey lines (read at every TLS handshake)", "",
     text([](Options& o) -> auto& { return o.tls.psk_file; })},
    {"tls-verify-peer", nullptr,
     "X.509: require a client certificate signed by ca-cert.pem; PSK: accepted, every client is verified by its key", "",
     flag([](Options& o) -> auto& { return o.tls.verify_peer; })},
    {"tls-priority", "STRING", "GnuTLS priority string (TLS 1.2 at least in any case)", d.tls.priority,
     text([](Options& o) -> auto& { return o.tls.priority; })},
    {"stats-file", "PATH", "write statistics as JSON here at exit and on SIGUSR1", "",
     text([](Options& o) -> auto& { return o.stats_file; })},
    {"stats-interval", "D", "period of the logged summary (0: off)", format_duration(d.stats_interval),
     duration([](Options& o) -> auto& { return o.stats_interval; }, "off")},
    {"metrics", "ADDR:PORT", "serve Prometheus metrics at http://ADDR:PORT/metrics", "",
     text([](Options& o) -> auto& { return o.metrics_address; })},
    {"config", "FILE", "read options from FILE: one 'key = value' per line, every long option a key; the command line wins",
     "", nullptr},
    {"print-config", nullptr, "print the effective settings as a config file and exit", "", nullptr},
    {"log-format", "FORMAT", "text | json (one object per line: time, level, message)", d.log_format,
     [](const std::string& value, Options& o) -> Refusal {
       if (value != "text" && value != "json") return "must be text or json";
       o.log_format = value;
       return std::nullopt;
     }},
    {"reconnect-max", "D",
     "exit with status 3 after this long without any upstream connection, for systemd's Restart= (0: retry forever)",
     format_duration(d.reconnect_max), duration([](Options& o) -> auto& { return o.reconnect_max; }, "forever")},
  };
  // clang-format on
}

std::string long_name(const char* name) {
  std::string_view n(name);
  return std::string(n.substr(0, n.find(',')));
}

ParseResult fail(const std::string& message) {
  return {std::nullopt, 2, "bscache: " + message};
}

// The text each option was given as, by long name: what --print-config shows.
using Given = std::map<std::string, std::string>;

// Applies --config FILE to `options`: every key must be a row of the table
// with a `store` (not help, version, config or print-config); switches take
// true or false. Errors name the file, the line and the key.
std::optional<std::string> apply_config_file(const std::vector<OptionSpec>& table, const std::string& file,
                                             Options& options, Given& given) {
  std::ifstream in(file);
  std::stringstream text;
  text << in.rdbuf();
  if (!in) return "--config " + file + ": cannot read it: " + strerror(errno);
  auto parsed = parse_config(text.str());
  // "line N: why" becomes "FILE:N: why", as compilers name places.
  if (auto* error = std::get_if<std::string>(&parsed)) return file + ":" + error->substr(std::string("line ").size());
  for (const auto& entry : std::get<std::vector<ConfigEntry>>(parsed)) {
    const std::string where = file + ":" + std::to_string(entry.line) + ": ";
    auto spec =
        std::find_if(table.begin(), table.end(), [&](const OptionSpec& s) { return long_name(s.name) == entry.key; });
    if (spec == table.end() || !spec->store) return where + "unknown key '" + entry.key + "' (see --help)";
    if (!spec->config_key) return where + entry.key + " is for the command line only, not for a config file";
    if (!spec->value_name) {
      if (entry.value != "true" && entry.value != "false") {
        return where + entry.key + " must be true or false (got '" + entry.value + "')";
      }
      if (entry.value == "true") spec->store(entry.value, options);
    } else if (auto refusal = spec->store(entry.value, options)) {
      return where + entry.key + " " + *refusal + " (got '" + entry.value + "')";
    }
    given[entry.key] = entry.value;
  }
  return std::nullopt;
}

// The effective settings as a config file that --config reads back: each
// option's help as a comment, then its value; options without one commented out.
std::string render_config(const std::vector<OptionSpec>& table, const Given& given) {
  std::ostringstream out;
  out << "# bscache configuration (bscache --print-config). Every long option is a key;\n"
         "# the command line wins over this file.\n";
  for (const auto& spec : table) {
    if (!spec.store || !spec.config_key) continue;
    const std::string name = long_name(spec.name);
    auto it = given.find(name);
    std::string value = it != given.end() ? it->second : spec.value_name ? spec.default_text : "false";
    out << "\n# ";
    if (spec.value_name) out << spec.value_name << ": ";
    out << spec.help << '\n';
    if (value.empty()) {
      out << "# " << name << " =\n";
    } else {
      out << name << " = " << value << '\n';
    }
  }
  return out.str();
}

// The rules that involve more than one option; each option's own value was
// checked when it was stored.
std::optional<std::string> validate(const Options& o) {
  if (o.upstream.uri.empty() == o.upstream.command.empty()) {
    return "give exactly one of --upstream URI and --upstream-command CMD";
  }
  if (o.listen.single && (!o.listen.unix_path.empty() || o.listen.port || o.listen.systemd || !o.run.empty())) {
    // As nbdkit refuses -s with -U, -p or --run: the one client comes from stdin or socket activation.
    return "-s/--single serves one client on stdin (or a socket-activation socket): it cannot be combined with "
           "--unix, --port, --systemd or --run";
  }
  if (o.listen.unix_path.empty() && !o.listen.port && !o.listen.systemd && o.run.empty() && !o.listen.single) {
    return "nothing to listen on: give --unix PATH, --port N, --systemd, --run CMD or -s";
  }
  const bool tls_credentials = !o.tls.certificates_dir.empty() || !o.tls.psk_file.empty();
  if (o.tls.mode == TlsMode::Off && (tls_credentials || o.tls.verify_peer)) {
    return "--tls-certificates, --tls-psk and --tls-verify-peer need --tls on or --tls require";
  }
  if (o.tls.mode != TlsMode::Off && o.tls.certificates_dir.empty() == o.tls.psk_file.empty()) {
    return "--tls needs exactly one of --tls-certificates DIR and --tls-psk FILE";
  }
  // --tls-verify-peer with --tls-psk is accepted, as nbdkit accepts it: a PSK
  // handshake succeeds only for a client holding a key from the file, so every
  // client is verified already.
  if (!o.upstream.tls.certificates_dir.empty() && !o.upstream.tls.psk_file.empty()) {
    return "give at most one of --upstream-tls-certificates and --upstream-tls-psk";
  }
  return std::nullopt;
}

}  // namespace

ParseResult parse_options(int argc, const char* const argv[], bool socket_activated) {
  const std::vector<OptionSpec> table = option_table();
  po::options_description desc(
      "bscache: a caching block-status proxy for NBD\n\n"
      "Usage: bscache --upstream URI (--unix PATH | --port N | --run CMD | -s) [options]\n\nOptions");
  for (const auto& spec : table) {
    if (!spec.value_name) {
      desc.add_options()(spec.name, spec.help);
      continue;
    }
    auto* value = po::value<std::string>()->value_name(spec.value_name);
    if (!spec.default_text.empty()) value->default_value(spec.default_text);
    desc.add_options()(spec.name, value, spec.help);
  }

  po::variables_map given;
  try {
    po::store(po::command_line_parser(argc, argv).options(desc).run(), given);
  } catch (const po::error& e) {
    return fail(std::string(e.what()) + " (see --help)");
  }
  if (given.count("help")) {
    std::ostringstream help;
    help << desc;
    return {std::nullopt, 0, help.str()};
  }
  if (given.count("version")) return {std::nullopt, 0, "bscache " BSCACHE_VERSION};

  Options options;
  Given settings;
  if (given.count("config")) {
    if (auto error = apply_config_file(table, given["config"].as<std::string>(), options, settings)) {
      return fail(*error);
    }
  }
  for (const auto& spec : table) {
    const std::string name = long_name(spec.name);
    if (!spec.store || !given.count(name) || given[name].defaulted()) continue;
    const std::string value = spec.value_name ? given[name].as<std::string>() : std::string();
    if (auto refusal = spec.store(value, options)) {
      return fail("--" + name + " " + *refusal + (spec.value_name ? " (got '" + value + "')" : ""));
    }
    settings[name] = spec.value_name ? value : "true";
  }
  if (given.count("print-config")) return {std::nullopt, 0, render_config(table, settings)};
  // nbdkit's convention: started by socket activation with nowhere else to
  // listen (nbdinfo/nbdcopy '-- [ bscache --upstream URI ]'), serve the passed
  // sockets as if --systemd were given.
  auto& listen = options.listen;
  if (socket_activated && listen.unix_path.empty() && !listen.port && !listen.single && options.run.empty()) {
    listen.systemd = true;
  }
  if (auto refusal = validate(options)) return fail(*refusal);
  auto& limits = options.block_status.limits;
  limits.max_extents = std::max<size_t>(cache::max_extents_for_memory(options.cache_max_memory), 1);
  if (options.cache_max_extents > 0) limits.max_extents = std::min(limits.max_extents, options.cache_max_extents);
  return {std::move(options), 0, {}};
}

}  // namespace bscache::proxy
