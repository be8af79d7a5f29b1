#include "proxy/upstream/reconnector.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>

namespace bscache::proxy {

Reconnector::Reconnector(size_t index, const UpstreamTarget& target, UpstreamOptions options)
    : index_(index), target_(target), options_(options) {}

void Reconnector::log_lost(std::string_view why, size_t failed_commands) const {
  spdlog::warn("upstream connection {} lost: {}; {} commands in flight fail", index_, why, failed_commands);
}

OpenedUpstream Reconnector::open(For engine) const {
  return engine == For::Wire ? open_wire_upstream(target_) : open_libnbd_upstream(target_);
}

void Reconnector::failed(std::string_view why) {
  ++failures_;
  spdlog::warn("upstream connection {}: reconnect attempt {} failed: {}", index_, failures_, why);
  backoff_ = std::min(backoff_ * 2, kLongestBackoff);
}

void Reconnector::succeeded() {
  spdlog::info("upstream connection {} reconnected after {} failed attempts", index_, failures_);
  failures_ = 0;
  backoff_ = kFirstBackoff;
}

std::chrono::milliseconds Reconnector::timeout_check_period() const {
  return std::max<std::chrono::milliseconds>(options_.timeout / 4, std::chrono::milliseconds(10));
}

}  // namespace bscache::proxy
