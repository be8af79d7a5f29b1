// Export: one upstream export as bscache serves it: its upstream connections,
// what it advertises to clients, its block-status cache and its counters.
// Nothing here is shared with another export, so a failing export leaves the
// others alone; a write reaches another export's cache only through the
// registry, when the two may be names of one disk (see may_alias()).
//
// Owned by the ExportRegistry (and kept alive by the sessions that use it);
// everything in it lives on the loop thread.
#pragma once

#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "proxy/exports/block_status_service.hpp"
#include "proxy/exports/config.hpp"
#include "proxy/exports/write_gate.hpp"
#include "proxy/io/asio.hpp"
#include "proxy/negotiation/export_info.hpp"
#include "proxy/ops/metrics.hpp"
#include "proxy/upstream/pool.hpp"

namespace bscache::proxy {

// The export cannot be served with these settings (see Export's constructor).
struct ExportRefused : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Export {
 public:
  // `handles` are open connections to this export (see UpstreamPool::connect).
  // Throws ExportRefused if the export cannot be served with these
  // settings (a --fetch-window below its minimum block size).
  // `may_alias`: upstream does not list this name, so it may be another name
  // for a disk also served under a name upstream lists.
  Export(asio::io_context& io, std::string name, std::vector<OpenedUpstream> handles, const UpstreamTarget& target,
         const ExportSettings& settings, std::shared_ptr<Metrics> metrics, bool may_alias = false);
  Export(const Export&) = delete;
  Export& operator=(const Export&) = delete;

  const std::string& name() const { return name_; }
  bool may_alias() const { return may_alias_; }
  // What new clients are offered now (it changes if upstream comes back different).
  const ExportInfo& info() const { return info_; }
  UpstreamPool& upstream() { return *upstream_; }
  const UpstreamPool& upstream() const { return *upstream_; }
  BlockStatusService& block_status() { return *block_status_; }
  const BlockStatusService& block_status() const { return *block_status_; }
  Metrics& metrics() { return *metrics_; }
  const Metrics& metrics() const { return *metrics_; }
  // Which writes may run together, when upstream needs aligned requests.
  WriteGate& write_gate() { return write_gate_; }

  // Called after a connection of this export was lost or came back.
  void on_state_change(std::function<void()> callback) { on_state_ = std::move(callback); }

  // When the last client (session or handshake holding it) came or went.
  std::chrono::steady_clock::time_point last_used() const { return last_used_; }
  bool idle() const { return clients_ == 0 && (!upstream_ || upstream_->in_flight() == 0); }
  // The cache's gauges, live, or as they were when the export closed.
  CacheGauges cache_gauges() const;

  // Joins the upstream connections' threads now (idle, or at teardown before
  // the loop goes away); the export serves nothing afterwards and only
  // cache_gauges(), metrics() and the client count may be used.
  void close();
  bool closed() const { return !upstream_; }

  // A client's hold on an export: while one exists the export stays open.
  class Hold {
   public:
    explicit Hold(std::shared_ptr<Export> e);
    ~Hold();
    Hold(const Hold&) = delete;
    Hold& operator=(const Hold&) = delete;
    Export& operator*() const { return *export_; }
    Export* operator->() const { return export_.get(); }

   private:
    std::shared_ptr<Export> export_;
  };

 private:
  void connection_changed(const std::optional<UpstreamInfo>& reconnected);

  const std::string name_;
  const bool may_alias_;
  const bool read_only_;
  std::shared_ptr<Metrics> metrics_;  // shared with the registry: counters outlive a closed export
  std::unique_ptr<UpstreamPool> upstream_;
  ExportInfo info_;
  std::unique_ptr<BlockStatusService> block_status_;
  std::function<void()> on_state_;
  WriteGate write_gate_;
  CacheGauges final_gauges_;  // after close()
  size_t clients_ = 0;
  std::chrono::steady_clock::time_point last_used_ = std::chrono::steady_clock::now();
};

}  // namespace bscache::proxy
