#include "proxy/exports/export.hpp"

#include <spdlog/spdlog.h>

#include <stdexcept>

#include "proxy/ops/logging.hpp"

namespace bscache::proxy {

Export::Export(asio::io_context& io, std::string name, std::vector<OpenedUpstream> handles,
               const UpstreamTarget& target, const ExportSettings& settings, std::shared_ptr<Metrics> metrics,
               bool may_alias)
    : name_(std::move(name)),
      may_alias_(may_alias),
      read_only_(settings.read_only),
      metrics_(std::move(metrics)),
      write_gate_(io) {
  if (handles.empty()) throw std::logic_error("Export: no upstream connection");
  // Checked before any connection thread starts.
  info_ = make_export_info(handles.front().info, read_only_);
  if (settings.block_status.max_window < info_.min_block) {
    // A window must hold at least one whole block of the upstream's.
    throw ExportRefused("--fetch-window " + std::to_string(settings.block_status.max_window) +
                        " is below the minimum block size " + std::to_string(info_.min_block) +
                        " of upstream export \"" + name_ + "\"");
  }
  upstream_ = std::make_unique<UpstreamPool>(io, std::move(handles), target, settings.upstream, *metrics_);
  block_status_ = std::make_unique<BlockStatusService>(io, *upstream_, info_, settings.block_status, *metrics_);
  upstream_->on_state_change(
      [this](const std::optional<UpstreamInfo>& reconnected) { connection_changed(reconnected); });
}

void Export::connection_changed(const std::optional<UpstreamInfo>& reconnected) {
  // The upstream may have changed while we could not see it: nothing cached stays.
  block_status_->clear();
  if (reconnected) {
    ExportInfo fresh = make_export_info(*reconnected, read_only_);
    if (fresh != info_) {
      // New clients get the export as it is now; connected ones keep what
      // they negotiated (upstream refuses their requests past its new end).
      spdlog::warn(
          "upstream export \"{}\" changed across the reconnect (size {} -> {}, flags {:#x} -> {:#x}, contexts {} -> "
          "{}): new clients see the new export",
          name_, info_.size, fresh.size, info_.tx_flags, fresh.tx_flags, log_list(info_.contexts),
          log_list(fresh.contexts));
      info_ = std::move(fresh);
    }
  }
  if (on_state_) on_state_();
}

CacheGauges Export::cache_gauges() const {
  return block_status_ ? block_status_->gauges() : final_gauges_;
}

void Export::close() {
  if (!block_status_) return;
  final_gauges_ = block_status_->gauges();
  block_status_.reset();
  upstream_.reset();  // joins the connection threads
}

Export::Hold::Hold(std::shared_ptr<Export> e) : export_(std::move(e)) {
  ++export_->clients_;
  export_->last_used_ = std::chrono::steady_clock::now();
}

Export::Hold::~Hold() {
  --export_->clients_;
  export_->last_used_ = std::chrono::steady_clock::now();
}

}  // namespace bscache::proxy
