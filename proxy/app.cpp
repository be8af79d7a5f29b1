#include "proxy/app.hpp"

#include <signal.h>
#include <spawn.h>
#include <spdlog/spdlog.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>

#include <boost/asio/signal_set.hpp>

#include "proxy/exports/export_registry.hpp"
#include "proxy/io/memory_reclaimer.hpp"
#include "proxy/ops/logging.hpp"
#include "proxy/ops/metrics_http.hpp"
#include "proxy/ops/service_notify.hpp"
#include "proxy/server/server.hpp"
#include "proxy/server/tls/tls_server.hpp"
#include "proxy/upstream/child_process.hpp"
#include "proxy/upstream/pool.hpp"

extern char** environ;

namespace bscache::proxy {

namespace {

constexpr auto kDrainTimeout = std::chrono::seconds(10);
// --reconnect-max ran out: a service manager should restart us.
constexpr int kExitUpstreamLost = 3;

// Pipes may take a quarter of the descriptors (two each), between 16 and
// 4,096 pipes: the rest stays for client and upstream sockets.
size_t pipe_limit() {
  rlimit files{};
  if (getrlimit(RLIMIT_NOFILE, &files) != 0 || files.rlim_cur == RLIM_INFINITY) return 4096;
  return std::clamp<size_t>(files.rlim_cur / 8, 16, 4096);
}

// --exports not given: one export if the command line names one (--export-name,
// even "", or the URI's path), else every export upstream has.
ExportsMode exports_mode(const Options& options, const UpstreamTarget& target) {
  if (options.exports_mode_given) return options.exports.mode;
  if (target.export_name_set) return ExportsMode::Single;
  return named_export(target).empty() ? ExportsMode::Passthrough : ExportsMode::Single;
}

class App {
 public:
  App(const Options& options, pid_t parent) : options_(options), parent_(parent) {}
  int run();

 private:
  bool connect_upstream();
  bool listen();
  bool write_pidfile();
  void handle_signals();
  bool follow_parent();
  void teardown();
  void start_child();
  void reap_child();
  void write_stats();
  void log_summary();
  void watch_upstream();
  // Every export's counters summed, with the client connection counters.
  Metrics totals() const;
  std::string describe_upstream() const;
  // `why` becomes systemd's STATUS= while stopping (default: finishing the requests in flight).
  awaitable<void> shutdown(std::string why = "");
  awaitable<void> periodic_summary();
  awaitable<void> sleep(std::chrono::milliseconds d) {
    asio::steady_timer t(io_, d);
    boost::system::error_code ignored;
    co_await t.async_wait(asio::redirect_error(use_awaitable, ignored));
  }
  template <typename Handler>
  void on_signals(asio::signal_set& signals, Handler handler) {
    signals.async_wait([this, &signals, handler](boost::system::error_code ec, int signal) {
      if (ec) return;
      handler(signal);
      on_signals(signals, handler);
    });
  }

  const Options& options_;
  const pid_t parent_;  // our parent when main() began, for --exit-with-parent
  asio::io_context io_;
  ServiceNotifier notifier_{io_};  // first: it takes NOTIFY_SOCKET out of the environment before any child starts
  Metrics metrics_;
  BufferPool buffers_;
  PipePool pipes_{64, pipe_limit()};
  ClientMemory client_memory_{options_.session.max_client_memory};
  MemoryReclaimer reclaimer_{io_, client_memory_, buffers_};
  std::unique_ptr<UpstreamChild> upstream_child_;  // --upstream-command's server; outlives exports_
  std::unique_ptr<ExportRegistry> exports_;
  std::unique_ptr<TlsServerCredentials> tls_;
  std::unique_ptr<ProxyContext> context_;
  std::unique_ptr<Server> server_;
  std::unique_ptr<MetricsHttp> metrics_http_;
  std::unique_ptr<asio::signal_set> stop_signals_, usr1_, children_;
  std::filesystem::path temp_dir_;
  asio::steady_timer give_up_{io_};  // --reconnect-max: armed while no upstream connection is up
  bool give_up_armed_ = false;
  pid_t child_ = -1;
  int exit_code_ = 0;
  bool shutting_down_ = false;
};

int App::run() {
  if (!connect_upstream() || !listen() || !write_pidfile()) return exit_code_ ? exit_code_ : 1;
  notifier_.ready("listening on " + server_->describe());
  handle_signals();
  if (options_.exit_with_parent && !follow_parent()) {
    asio::co_spawn(io_, shutdown("the parent process is gone (--exit-with-parent)"), asio::detached);
  } else if (!options_.run.empty()) {
    start_child();
  }
  if (options_.listen.single) {
    server_->on_single_client_done(
        [this] { asio::co_spawn(io_, shutdown("the one client (-s) disconnected"), asio::detached); });
  }
  if (options_.stats_interval.count() > 0) asio::co_spawn(io_, periodic_summary(), asio::detached);
  reclaimer_.start();
  io_.run();
  teardown();
  return exit_code_;
}

bool App::connect_upstream() {
  try {
    UpstreamTarget target = options_.upstream;
    if (!target.command.empty()) {
      // One server for every connection: see UpstreamChild.
      upstream_child_ = std::make_unique<UpstreamChild>(target.command);
      target.uri = upstream_child_->uri(target.tls.any());
      target.command.clear();
    }
    ExportLimits limits = options_.exports;
    limits.mode = exports_mode(options_, target);
    const ExportSettings settings{options_.upstream_options, options_.block_status, options_.read_only};
    exports_ = std::make_unique<ExportRegistry>(io_, target, settings, limits);
    exports_->start();
  } catch (const ExportRefused& e) {
    spdlog::error("bscache: {}", e.what());
    exit_code_ = 2;  // a usage error, like every other refused option
    return false;
  } catch (const std::exception& e) {
    spdlog::error("{}", e.what());
    return false;
  }
  exports_->on_state_change([this] { watch_upstream(); });
  if (options_.tls.mode != TlsMode::Off) {
    try {
      tls_ = std::make_unique<TlsServerCredentials>(options_.tls);
    } catch (const std::exception& e) {
      spdlog::error("bscache: {}", e.what());
      exit_code_ = 2;  // a file named by an option is unusable: a usage error
      return false;
    }
  }
  context_ = std::make_unique<ProxyContext>(
      ProxyContext{io_, *exports_, metrics_, buffers_, &pipes_, client_memory_, options_.session, tls_.get()});
  return true;
}

bool App::listen() {
  ListenConfig listen = options_.listen;
  const bool captive_default = !options_.run.empty() && listen.unix_path.empty() && !listen.port && !listen.systemd;
  if (captive_default || listen.unix_path == "-") {
    // Captive mode with no listener named, or nbdkit's "-U -": a private
    // socket in a fresh directory, which nobody else can reach or race for.
    std::string pattern = (std::filesystem::temp_directory_path() / "bscacheXXXXXX").string();
    if (!mkdtemp(pattern.data())) {
      spdlog::error("mkdtemp: {}", strerror(errno));
      return false;
    }
    temp_dir_ = pattern;
    listen.unix_path = (temp_dir_ / "nbd.sock").string();
  }
  try {
    server_ = std::make_unique<Server>(*context_, listen);
    if (!options_.metrics_address.empty()) {
      metrics_http_ = std::make_unique<MetricsHttp>(io_, options_.metrics_address, [this] {
        return render_prometheus(totals(), exports_->cache_totals(), options_.block_status.coherence.describe(),
                                 exports_->stats());
      });
    }
  } catch (const std::exception& e) {
    spdlog::error("cannot listen: {}", e.what());
    return false;
  }
  server_->start();
  if (metrics_http_) metrics_http_->start();
  spdlog::info("bscache {}: upstream {}, policy {}, prefetch {}, listening on {}{}{}", BSCACHE_VERSION,
               describe_upstream(), options_.block_status.coherence.describe(),
               options_.block_status.prefetch.enabled ? "on" : "off", server_->describe(),
               metrics_http_ ? ", metrics on http://" + metrics_http_->endpoint() + "/metrics" : "",
               tls_ ? std::string(options_.tls.mode == TlsMode::Require ? ", TLS required (" : ", TLS offered (") +
                          tls_->describe() + ")"
                    : "");
  return true;
}

// The pidfile is the readiness signal: written once we accept connections.
bool App::write_pidfile() {
  if (options_.pidfile.empty()) return true;
  std::string error;
  if (!write_file_atomically(options_.pidfile, std::to_string(getpid()) + "\n", error)) {
    spdlog::error("pidfile: {}", error);
    return false;
  }
  return true;
}

void App::handle_signals() {
  stop_signals_ = std::make_unique<asio::signal_set>(io_, SIGINT, SIGTERM);
  on_signals(*stop_signals_, [this](int signal) {
    spdlog::info("signal {}: shutting down", signal);
    if (child_ > 0) kill(child_, SIGTERM);
    asio::co_spawn(io_, shutdown(), asio::detached);
  });
  usr1_ = std::make_unique<asio::signal_set>(io_, SIGUSR1);
  on_signals(*usr1_, [this](int) { write_stats(); });
  children_ = std::make_unique<asio::signal_set>(io_, SIGCHLD);
  on_signals(*children_, [this](int) { reap_child(); });
}

// --exit-with-parent: SIGTERM when the parent dies, handled as any SIGTERM
// (hence set only now that the signal handlers are in place). A parent that
// died before prctl took effect left us with another parent: exit at once.
// Linux sends the signal when the parent *thread* that started us ends; a
// multi-threaded parent must start bscache from a thread that lives as long.
bool App::follow_parent() {
  if (::prctl(PR_SET_PDEATHSIG, SIGTERM) != 0) spdlog::warn("--exit-with-parent: prctl: {}", strerror(errno));
  if (getppid() == parent_) return true;
  spdlog::info("--exit-with-parent: the parent process (pid {}) is already gone", parent_);
  return false;
}

void App::teardown() {
  server_.reset();
  // Joins the upstream threads (their libnbd handles closed) before this
  // thread opens files of its own: ThreadSanitizer cannot see libnbd close a
  // descriptor, and would take the reuse of its number for a race.
  exports_->close_all();
  upstream_child_.reset();
  log_summary();
  write_stats();
  if (!options_.pidfile.empty()) unlink(options_.pidfile.c_str());
  if (!temp_dir_.empty()) {
    std::error_code ignored;
    std::filesystem::remove_all(temp_dir_, ignored);
  }
}

void App::start_child() {
  // With --tls require only a TLS client gets in: say so in the scheme
  // (nbds://, nbds+unix://); the child adds its credentials to the query.
  std::string uri = server_->uri();
  if (options_.tls.mode == TlsMode::Require) uri.insert(3, "s");
  setenv("uri", uri.c_str(), 1);
  setenv("nbd", uri.c_str(), 1);
  if (!server_->unix_path().empty()) setenv("unixsocket", server_->unix_path().c_str(), 1);
  if (server_->tcp_port()) setenv("port", std::to_string(*server_->tcp_port()).c_str(), 1);
  // As nbdkit sets them: $tls is 1 for --tls on, 2 for require; $exportname is
  // the name to ask for ("": upstream's default export, or the one export).
  if (options_.tls.mode != TlsMode::Off) setenv("tls", options_.tls.mode == TlsMode::Require ? "2" : "1", 1);
  setenv("exportname", "", 1);
  const char* argv[] = {"/bin/sh", "-c", options_.run.c_str(), nullptr};
  if (int rc = posix_spawn(&child_, "/bin/sh", nullptr, nullptr, const_cast<char* const*>(argv), environ); rc != 0) {
    spdlog::error("--run: cannot start /bin/sh: {}", strerror(rc));
    exit_code_ = 1;
    child_ = -1;
    asio::co_spawn(io_, shutdown(), asio::detached);
  }
}

void App::reap_child() {
  if (child_ <= 0) return;
  int status = 0;
  if (waitpid(child_, &status, WNOHANG) != child_) return;
  child_ = -1;
  // Giving up on the upstream ends the child too; the exit status stays 3.
  if (exit_code_ == kExitUpstreamLost) return;
  exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  spdlog::debug("--run command exited with status {}", exit_code_);
  asio::co_spawn(io_, shutdown(), asio::detached);
}

awaitable<void> App::shutdown(std::string why) {
  if (shutting_down_) co_return;
  shutting_down_ = true;
  notifier_.stopping("stopping: " + (why.empty() ? std::string("finishing the requests in flight") : why));
  server_->stop();
  if (metrics_http_) metrics_http_->stop();
  // Sessions finish the requests they have in flight; a bounded wait.
  const auto deadline = std::chrono::steady_clock::now() + kDrainTimeout;
  while (server_->session_count() > 0 && std::chrono::steady_clock::now() < deadline) {
    co_await sleep(std::chrono::milliseconds(10));
  }
  if (server_->session_count() > 0) spdlog::warn("{} connections still busy at shutdown", server_->session_count());
  while (exports_->in_flight() > 0 && std::chrono::steady_clock::now() < deadline) {
    co_await sleep(std::chrono::milliseconds(10));
  }
  exports_->shutdown();
  reclaimer_.stop();
  io_.stop();
}

void App::write_stats() {
  if (options_.stats_file.empty()) return;
  std::string error;
  auto json = render_stats_json(totals(), exports_->cache_totals(), options_.block_status.coherence.describe(),
                                exports_->stats());
  if (!write_file_atomically(options_.stats_file, json, error)) spdlog::warn("stats file: {}", error);
}

Metrics App::totals() const {
  Metrics sum = exports_->totals();
  sum.started = metrics_.started;
  sum.connections_current = metrics_.connections_current;
  sum.connections_total = metrics_.connections_total;
  sum.connections_rejected = metrics_.connections_rejected;
  sum.client_memory_bytes = client_memory_.held();
  sum.client_memory_limit = client_memory_.limit();
  sum.client_memory_pauses = client_memory_.pauses();
  sum.client_memory_paused = client_memory_.paused();
  sum.memory_trims = reclaimer_.trims();
  return sum;
}

std::string App::describe_upstream() const {
  const std::string where = options_.upstream.uri.empty() ? log_list(options_.upstream.command) : options_.upstream.uri;
  const Export* single = exports_->single();
  if (!single) return where + " (every export it has, each opened on its first client)";
  const auto& pool = single->upstream();
  return fmt::format("{} ({} bytes, contexts: {}, {} connection{})", where, single->info().size,
                     log_list(pool.info().contexts), pool.connections(), pool.connections() == 1 ? "" : "s");
}

void App::log_summary() {
  const Metrics m = totals();
  const uint64_t asked = m.client_requests[wire::kCmdBlockStatus];
  const uint64_t sent = m.upstream_requests[wire::kCmdBlockStatus];
  spdlog::info("block status: {} hits, {} misses (hit rate {:.1f}%), {} client requests, {} sent upstream, {} saved",
               m.block_status_hits, m.block_status_misses, 100 * hit_rate(m), asked, sent, upstream_calls_saved(m));
}

// With --reconnect-max D: once no upstream connection is up, give the
// reconnects D to bring one back, else exit so systemd's Restart= starts a
// fresh bscache (whose start-up fails fast and visibly if upstream is gone).
void App::watch_upstream() {
  const bool any_up = !exports_->any_export_down();
  if (any_up || shutting_down_) {
    if (give_up_armed_) give_up_.cancel();
    give_up_armed_ = false;
    return;
  }
  notifier_.status("no upstream connection: reconnecting");
  if (options_.reconnect_max.count() == 0 || give_up_armed_) return;
  give_up_armed_ = true;
  give_up_.expires_after(options_.reconnect_max);
  give_up_.async_wait([this](boost::system::error_code ec) {
    if (ec || !give_up_armed_ || shutting_down_) return;
    const std::string why =
        fmt::format("no upstream connection for {} ms (--reconnect-max): giving up", options_.reconnect_max.count());
    spdlog::error("{}", why);
    exit_code_ = kExitUpstreamLost;
    if (child_ > 0) kill(child_, SIGTERM);
    asio::co_spawn(io_, shutdown(why), asio::detached);
  });
}

awaitable<void> App::periodic_summary() {
  while (!shutting_down_) {
    co_await sleep(options_.stats_interval);
    if (shutting_down_) break;
    log_summary();
    const Metrics m = totals();
    notifier_.status(fmt::format(
        "hit rate {:.1f}%, {} upstream calls saved, {} clients, {} of {} upstream connections up, {} exports open",
        100 * hit_rate(m), upstream_calls_saved(m), m.connections_current, m.upstream_connections,
        exports_->connections(), exports_->open_count()));
  }
}

}  // namespace

int run_bscache(const Options& options, pid_t parent) {
  App app(options, parent);
  return app.run();
}

}  // namespace bscache::proxy
