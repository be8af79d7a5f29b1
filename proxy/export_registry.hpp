// ExportRegistry: which upstream exports bscache serves, opened when a client
// first names them.
//
// --exports single: one export, opened at start-up; whatever name a client
// gives selects it (as nbdkit does for a plugin without exports), LIST shows
// only it. --exports passthrough: a client's name selects the upstream export
// of that name. It is opened (its own connections, cache and counters: see
// Export) on the first client that names it, off the loop thread, and closed
// after --export-idle-timeout without clients. LIST returns upstream's list.
//
// Two names must never mean the same upstream data under two caches (a write
// through one would leave the other's cache stale). So in passthrough a name
// upstream does not list is refused when upstream answers LIST (nbdkit's
// plugins without exports accept any name for one disk, and list only ""),
// and exports are keyed by the canonical name upstream reports (the default
// export "" and its real name share one Export).
#pragma once

#include <chrono>
#include <cstddef>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <boost/asio/thread_pool.hpp>

#include "proxy/asio.hpp"
#include "proxy/export.hpp"
#include "proxy/handshake.hpp"

namespace bscache::proxy {

enum class ExportsMode { Single, Passthrough };

struct ExportLimits {
  ExportsMode mode = ExportsMode::Single;
  // Exports open at once (passthrough). Default: 64.
  size_t max_exports = 64;
  // An export with no clients this long is closed (passthrough). Default: 60 s.
  std::chrono::milliseconds idle_timeout{60'000};
};

// A name looked up: a hold on its export, or why not.
struct ExportLookup {
  std::unique_ptr<Export::Client> client;  // null: refused
  uint32_t error = 0;                      // an NBD_REP_ERR_* when refused
  std::string message;
};

class ExportRegistry {
 public:
  ExportRegistry(asio::io_context& io, UpstreamTarget target, ExportSettings settings, ExportLimits limits);
  ~ExportRegistry();
  ExportRegistry(const ExportRegistry&) = delete;
  ExportRegistry& operator=(const ExportRegistry&) = delete;

  // At start-up, blocking. Single: opens the export. Passthrough: checks that
  // upstream answers (and logs what it lists). Throws std::runtime_error.
  void start();
  ExportsMode mode() const { return limits_.mode; }
  // Single mode: the export (null in passthrough).
  Export* single() const { return single_.get(); }

  awaitable<ExportLookup> find(std::string name);
  awaitable<std::vector<ExportListing>> list();

  // Every export opened so far, open or closed (their counters stay), by name.
  std::vector<ExportStats> stats() const;
  // The sum over exports (counters of closed exports included); connection
  // counters are not per export and stay 0 here.
  Metrics totals() const;
  CacheGauges cache_totals() const;
  size_t open_count() const { return open_.size(); }
  size_t in_flight() const;
  // An open export has no upstream connection up.
  bool any_export_down() const;
  size_t connections() const;  // upstream connections of open exports
  void on_state_change(std::function<void()> callback) { on_state_ = std::move(callback); }

  // Asks every export's connections to disconnect once what is in flight is answered.
  void shutdown();
  // Teardown, after the loop stopped: joins every connection thread.
  void close_all();

 private:
  struct Opened;
  struct PendingOpen;

  awaitable<ExportLookup> open(const std::string& name);
  std::shared_ptr<Export> adopt(const std::string& key, Opened opened);
  ExportLookup hold(const std::shared_ptr<Export>& e) const;
  bool make_room();
  void arm_idle_sweep();
  void sweep_idle();
  void close(const std::string& key);
  std::shared_ptr<Metrics> metrics_for(const std::string& key);
  UpstreamTarget target_for(const std::string& name) const;
  template <typename F>
  void for_each_serving(F f) const;  // every export not closed

  asio::io_context& io_;
  const UpstreamTarget target_;
  const ExportSettings settings_;
  const ExportLimits limits_;
  std::shared_ptr<Export> single_;
  std::map<std::string, std::shared_ptr<Export>> open_;          // by canonical name
  std::map<std::string, std::string> aliases_;                   // a name clients used -> canonical name
  std::map<std::string, std::shared_ptr<PendingOpen>> opening_;  // by the name asked for
  std::map<std::string, std::shared_ptr<Metrics>> metrics_;      // by canonical name, kept after close
  std::optional<std::vector<ExportListing>> listing_;            // upstream's LIST, if it answers it
  std::chrono::steady_clock::time_point listing_at_;
  CacheGauges retired_cache_;  // evictions and expirations of closed exports' caches
  std::function<void()> on_state_;
  asio::steady_timer idle_sweep_;
  bool sweep_armed_ = false;
  // Blocking upstream work (connecting, LIST) runs here, never on the loop.
  // Last: joined first at destruction, before what its jobs refer to goes.
  boost::asio::thread_pool opener_{1};
};

}  // namespace bscache::proxy
