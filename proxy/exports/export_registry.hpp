// ExportRegistry: which upstream exports bscache serves, opened when a client
// first names them.
//
// --exports single: one export, opened at start-up; whatever name a client
// gives selects it (as nbdkit does for a plugin without exports), LIST shows
// only it. --exports passthrough: a client's name selects the upstream export
// of that name. It is opened (its own connections, cache and counters: see
// Export) on the first client that names it, off the loop thread, and closed
// after --export-idle-timeout without clients. LIST returns upstream's answer,
// its error included.
//
// Every name upstream accepts is served, listed or not, and a write through
// one name never leaves another name's cached map stale. Exports are keyed by
// the canonical name upstream reports, so "" and the name of upstream's
// default export share one Export. The names upstream lists are taken to be
// distinct disks. A name it does not list (nbdkit's single-disk plugins accept
// any name for their one disk; other servers make a new disk for a new name)
// may or may not be another listed disk: such an export "may alias", and a
// write, trim or zero through it makes every other export forget its whole
// map for as long as the write is in flight, as a write through any export
// does to those that may alias (see begin_aliased_write). When upstream does
// not list at all, every export may alias.
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

#include "proxy/exports/config.hpp"
#include "proxy/exports/export.hpp"
#include "proxy/io/asio.hpp"
#include "proxy/negotiation/upstream_info.hpp"

namespace bscache::proxy {

// A name looked up: a hold on its export, or why not.
struct ExportLookup {
  std::unique_ptr<Export::Hold> hold;  // null: refused
  uint32_t error = 0;                  // an NBD_REP_ERR_* when refused
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
  // Upstream's LIST answer (reused for 5 s; an error is asked again), or the
  // single export.
  awaitable<UpstreamListing> list();

  // Called just before a write, trim or zero through `writer` goes upstream
  // (in the same loop step): every other export that may show the same disk
  // (either of the two may alias) forgets its map and keeps no fetch that
  // overlaps the write, until the returned guard is released once the write
  // is answered. Exports opened meanwhile are covered too. Null when no
  // export can alias (--exports single).
  class AliasedWrite;
  std::shared_ptr<AliasedWrite> begin_aliased_write(const Export& writer);

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
  std::optional<UpstreamListing> listing_;                       // upstream's last LIST answer
  std::vector<std::weak_ptr<AliasedWrite>> aliased_writes_;      // in flight
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
