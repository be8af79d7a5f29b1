#include "proxy/options.hpp"

#include <wordexp.h>

#include <sstream>

#include <boost/program_options.hpp>

#include "policy/capacity.hpp"

namespace bscache::proxy {

namespace po = boost::program_options;

namespace {
// Shell-style word splitting (quotes, escapes) without running anything.
std::optional<std::vector<std::string>> split_command(const std::string& command) {
  wordexp_t words{};
  if (wordexp(command.c_str(), &words, WRDE_NOCMD | WRDE_UNDEF) != 0) return std::nullopt;
  std::vector<std::string> out(words.we_wordv, words.we_wordv + words.we_wordc);
  wordfree(&words);
  if (out.empty()) return std::nullopt;
  return out;
}

ParseResult fail(const std::string& message) {
  return {std::nullopt, 2, "bscache: " + message};
}

std::optional<std::chrono::milliseconds> to_millis(const std::string& text) {
  auto d = policy::parse_duration(text);
  if (!d) return std::nullopt;
  return std::chrono::duration_cast<std::chrono::milliseconds>(*d);
}
}  // namespace

ParseResult parse_options(int argc, const char* const argv[]) {
  Options o;
  std::string policy = "exclusive", prefetch = "on", handshake_timeout = "30s", stats_interval = "60s";
  std::string socket_mode = "0600", upstream_command, export_name, reconnect = "on", upstream_timeout = "0";
  std::optional<std::string> export_name_opt;
  int port = -1;
  uint64_t fetch_window = o.block_status.max_window;
  std::string cache_max_memory = "256M";
  size_t cache_max_extents = 0;

  po::options_description desc(
      "bscache: a caching block-status proxy for NBD\n\n"
      "Usage: bscache --upstream URI (--unix PATH | --port N | --run CMD) [options]\n\nOptions");
  // clang-format off
  desc.add_options()
    ("help,h", "show this help and exit")
    ("version", "show the version and exit")
    ("upstream", po::value(&o.upstream.uri), "upstream NBD URI (nbd://, nbd+unix://, nbds://)")
    ("upstream-command", po::value(&upstream_command),
     "start this upstream server as a child with systemd socket activation, e.g. 'nbdkit memory 1G'")
    ("reconnect", po::value(&reconnect)->default_value("on"),
     "on | off: reconnect to upstream (backoff 100 ms to 5 s) when the connection dies")
    ("upstream-timeout", po::value(&upstream_timeout)->default_value("0"),
     "drop and reconnect an upstream connection that leaves a command unanswered this long (0: off)")
    ("export-name", po::value<std::string>(), "upstream export name (default: the URI's, else \"\")")
    ("unix", po::value(&o.listen.unix_path), "listen on this Unix socket")
    ("port", po::value(&port), "listen on this TCP port (0: any free port)")
    ("bind", po::value(&o.listen.bind)->default_value("127.0.0.1"), "TCP address to listen on")
    ("systemd", po::bool_switch(&o.listen.systemd), "listen on sockets passed by systemd (LISTEN_FDS)")
    ("socket-mode", po::value(&socket_mode)->default_value("0600"), "permissions of the Unix socket (octal)")
    ("run", po::value(&o.run),
     "run CMD once listening, with $uri $nbd $unixsocket $port set; exit with its status")
    ("readonly,r", po::bool_switch(&o.read_only), "refuse writes (EPERM)")
    ("pidfile", po::value(&o.pidfile), "write our PID here once accepting connections")
    ("log-level", po::value(&o.log_level)->default_value("info"), "trace|debug|info|warn|error")
    ("policy", po::value(&policy)->default_value("exclusive"), "exclusive | ttl=DURATION | off")
    ("prefetch", po::value(&prefetch)->default_value("on"), "on | off: fetch ahead of sequential scans")
    ("cache-max-memory", po::value(&cache_max_memory)->default_value("256M"),
     "memory the cache may take (K/M/G suffixes); sets the most cached extents")
    ("cache-max-extents", po::value(&cache_max_extents),
     "most cached extents (default: what --cache-max-memory allows; the smaller wins)")
    ("allocation-granularity", po::value(&o.block_status.limits.allocation_granularity)
       ->default_value(o.block_status.limits.allocation_granularity),
     "a write forgets cached state around it rounded out to this many bytes (upstream allocation unit)")
    ("fetch-window", po::value(&fetch_window)->default_value(fetch_window),
     "largest block-status window asked of upstream on a miss, in bytes")
    ("max-connections", po::value(&o.listen.max_connections)->default_value(o.listen.max_connections),
     "most client connections at once")
    ("max-in-flight", po::value(&o.session.max_in_flight)->default_value(o.session.max_in_flight),
     "most requests in flight per client before we stop reading from it")
    ("handshake-timeout", po::value(&handshake_timeout)->default_value("30s"), "time a client has to finish the handshake")
    ("stats-file", po::value(&o.stats_file), "write statistics as JSON here at exit and on SIGUSR1")
    ("stats-interval", po::value(&stats_interval)->default_value("60s"), "period of the logged summary (0: off)")
    ("metrics", po::value(&o.metrics_address), "serve Prometheus metrics at http://ADDR:PORT/metrics");
  // clang-format on

  po::variables_map vm;
  try {
    po::store(po::command_line_parser(argc, argv).options(desc).run(), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    return fail(std::string(e.what()) + " (see --help)");
  }
  if (vm.count("help")) {
    std::ostringstream text;
    text << desc;
    return {std::nullopt, 0, text.str()};
  }
  if (vm.count("version")) return {std::nullopt, 0, "bscache " BSCACHE_VERSION};

  if (o.upstream.uri.empty() == upstream_command.empty()) {
    return fail("give exactly one of --upstream URI and --upstream-command CMD");
  }
  if (!upstream_command.empty()) {
    auto words = split_command(upstream_command);
    if (!words) return fail("cannot parse --upstream-command '" + upstream_command + "'");
    o.upstream.command = *words;
  }
  if (vm.count("export-name")) {
    o.upstream.export_name = vm["export-name"].as<std::string>();
    o.upstream.export_name_set = true;
  }
  if (port >= 0) {
    if (port > 65535) return fail("--port must be 0..65535");
    o.listen.port = static_cast<uint16_t>(port);
  }
  if (o.listen.unix_path.empty() && !o.listen.port && !o.listen.systemd && o.run.empty()) {
    return fail("nothing to listen on: give --unix PATH, --port N, --systemd or --run CMD");
  }
  try {
    size_t used = 0;
    o.listen.socket_mode = static_cast<unsigned>(std::stoul(socket_mode, &used, 8));
    if (used != socket_mode.size() || o.listen.socket_mode > 0777) throw std::invalid_argument("mode");
  } catch (const std::exception&) {
    return fail("--socket-mode must be an octal mode such as 0600");
  }
  static const char* const levels[] = {"trace", "debug", "info", "warn", "error"};
  if (std::find(std::begin(levels), std::end(levels), o.log_level) == std::end(levels)) {
    return fail("--log-level must be trace, debug, info, warn or error");
  }
  auto coherence = policy::parse_policy(policy);
  if (!coherence) return fail("--policy must be exclusive, off or ttl=DURATION (e.g. ttl=30s)");
  o.block_status.coherence = *coherence;
  if (prefetch != "on" && prefetch != "off") return fail("--prefetch must be on or off");
  o.block_status.prefetch.enabled = prefetch == "on";
  // --cache-max-memory and --cache-max-extents: the smaller limit wins.
  auto memory = policy::parse_byte_size(cache_max_memory);
  if (!memory) return fail("--cache-max-memory must be a size such as 256M");
  o.block_status.limits.max_extents = std::max<size_t>(cache::max_extents_for_memory(*memory), 1);
  if (vm.count("cache-max-extents")) {
    if (cache_max_extents == 0) return fail("--cache-max-extents must be at least 1");
    o.block_status.limits.max_extents = std::min(o.block_status.limits.max_extents, cache_max_extents);
  }
  if (fetch_window == 0) return fail("--fetch-window must be at least 1");
  if (o.block_status.limits.allocation_granularity == 0) return fail("--allocation-granularity must be at least 1");
  o.block_status.max_window = fetch_window;
  auto timeout = to_millis(handshake_timeout);
  if (!timeout || timeout->count() <= 0) return fail("--handshake-timeout must be a duration such as 30s");
  o.session.handshake_timeout = *timeout;
  auto interval = stats_interval == "0" ? std::optional(std::chrono::milliseconds(0)) : to_millis(stats_interval);
  if (!interval) return fail("--stats-interval must be a duration such as 60s, or 0");
  o.stats_interval = *interval;
  if (reconnect != "on" && reconnect != "off") return fail("--reconnect must be on or off");
  o.upstream_options.reconnect = reconnect == "on";
  auto timeout_value =
      upstream_timeout == "0" ? std::optional(std::chrono::milliseconds(0)) : to_millis(upstream_timeout);
  if (!timeout_value) return fail("--upstream-timeout must be a duration such as 30s, or 0");
  o.upstream_options.timeout = *timeout_value;
  if (o.session.max_in_flight == 0) return fail("--max-in-flight must be at least 1");
  if (o.listen.max_connections == 0) return fail("--max-connections must be at least 1");
  return {std::move(o), 0, {}};
}

}  // namespace bscache::proxy
