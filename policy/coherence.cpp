#include "policy/coherence.hpp"

#include <charconv>
#include <cmath>

namespace bscache::policy {

std::string CoherencePolicy::describe() const {
  switch (mode) {
    case CoherenceMode::Exclusive: return "exclusive";
    case CoherenceMode::Off: return "off";
    case CoherenceMode::Ttl:
      return "ttl=" + std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(ttl).count()) + "ms";
  }
  return "unknown";
}

std::optional<std::chrono::nanoseconds> parse_duration(std::string_view text) {
  if (text.empty()) return std::nullopt;
  double value = 0;
  // from_chars for double is locale-independent (GCC 11+).
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || !std::isfinite(value) || value < 0) return std::nullopt;
  const std::string_view unit(end, static_cast<size_t>(text.data() + text.size() - end));
  double scale = 0;
  if (unit.empty() || unit == "s") {
    scale = 1e9;
  } else if (unit == "ms") {
    scale = 1e6;
  } else if (unit == "us") {
    scale = 1e3;
  } else if (unit == "ns") {
    scale = 1;
  } else if (unit == "m") {
    scale = 60e9;
  } else if (unit == "h") {
    scale = 3600e9;
  } else {
    return std::nullopt;
  }
  const double ns = value * scale;
  if (ns > 9e18) return std::nullopt;
  return std::chrono::nanoseconds(static_cast<int64_t>(std::llround(ns)));
}

std::optional<CoherencePolicy> parse_policy(std::string_view text) {
  if (text == "exclusive") return CoherencePolicy{CoherenceMode::Exclusive, {}};
  if (text == "off") return CoherencePolicy{CoherenceMode::Off, {}};
  if (text.starts_with("ttl=")) {
    auto ttl = parse_duration(text.substr(4));
    if (!ttl || ttl->count() <= 0) return std::nullopt;
    return CoherencePolicy{CoherenceMode::Ttl, *ttl};
  }
  return std::nullopt;
}

std::optional<uint32_t> state_after(Mutation mutation) {
  switch (mutation) {
    case Mutation::Write:
    case Mutation::Trim: return 0;
    case Mutation::WriteZeroes: return 2;  // ZERO; HOLE is never claimed
  }
  return std::nullopt;
}

}  // namespace bscache::policy
