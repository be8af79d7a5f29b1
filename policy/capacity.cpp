#include "policy/capacity.hpp"

#include <algorithm>
#include <charconv>

namespace bscache::policy {

size_t window_extent_budget(size_t capacity, unsigned depth) {
  return capacity / (2 + static_cast<size_t>(depth));
}

unsigned affordable_depth(size_t capacity, unsigned wanted) {
  const size_t windows = capacity / kMinWindowExtents;  // windows of the minimum size that fit
  if (windows <= 2) return 0;
  return static_cast<unsigned>(std::min<size_t>(wanted, windows - 2));
}

unsigned prefetch_allowance(unsigned depth, int64_t calls_saved) {
  if (calls_saved <= 0) return 0;
  return static_cast<unsigned>(std::min<int64_t>(depth, calls_saved));
}

bool should_bypass(size_t capacity) {
  return window_extent_budget(capacity, 0) < kMinWindowExtents;
}

uint64_t window_bytes(size_t extents, std::optional<double> bytes_per_extent, uint64_t max_window) {
  if (!bytes_per_extent) return max_window;
  const double bytes = std::max(1.0, static_cast<double>(extents) * *bytes_per_extent);
  return bytes >= static_cast<double>(max_window) ? max_window : static_cast<uint64_t>(bytes);
}

void DensityEstimator::record(size_t extents, uint64_t bytes) {
  if (extents == 0 || bytes == 0) return;
  const double sample = static_cast<double>(bytes) / static_cast<double>(extents);
  // Weight 1/2 on the new sample: the next window is most like the last one
  // (disks are dense in places), but one odd reply does not swing it fully.
  estimate_ = estimate_ ? (*estimate_ + sample) / 2 : sample;
}

std::optional<uint64_t> parse_byte_size(std::string_view text) {
  uint64_t value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end == text.data()) return std::nullopt;
  std::string_view unit(end, static_cast<size_t>(text.data() + text.size() - end));
  if (unit.ends_with("iB")) {
    unit.remove_suffix(2);
  } else if (unit.size() > 1 && unit.ends_with("B")) {
    unit.remove_suffix(1);
  }
  unsigned shift = 0;
  if (unit.empty() || unit == "B") {
    shift = 0;
  } else if (unit == "K" || unit == "k") {
    shift = 10;
  } else if (unit == "M") {
    shift = 20;
  } else if (unit == "G") {
    shift = 30;
  } else if (unit == "T") {
    shift = 40;
  } else {
    return std::nullopt;
  }
  if (value == 0 || value > (UINT64_MAX >> shift)) return std::nullopt;
  return value << shift;
}

}  // namespace bscache::policy
