// Coherence: how long cached states may be trusted, and what a mutation that
// passed through leaves behind.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace bscache::policy {

enum class CoherenceMode {
  Exclusive,  // bscache is the only writer: entries live until evicted or overwritten
  Ttl,        // other writers exist: entries older than ttl are misses
  Off,        // no caching: every request goes upstream unchanged
};

struct CoherencePolicy {
  CoherenceMode mode = CoherenceMode::Exclusive;
  std::chrono::nanoseconds ttl{0};  // only for Ttl
  std::string describe() const;     // "exclusive", "ttl=1500ms" (always in ms), "off"
  // Whether what upstream said in reply to a command sent `age` ago may still
  // answer a query: under a TTL only if age <= ttl. (The cache applies the
  // same rule to the stamps it stores; see ExtentCache.)
  bool fresh(std::chrono::nanoseconds age) const { return mode != CoherenceMode::Ttl || age <= ttl; }
};

// Parses "exclusive", "off" or "ttl=DURATION"; nullopt if malformed or a ttl is not > 0.
std::optional<CoherencePolicy> parse_policy(std::string_view text);

// Parses "250ms", "30s", "5m", "1h", "1.5s", "100us"; a bare number is seconds.
std::optional<std::chrono::nanoseconds> parse_duration(std::string_view text);

enum class Mutation { Write, Trim, WriteZeroes };

// base:allocation state a range has after a successful mutation: WRITE and
// TRIM leave 0 (contents undefined after TRIM), WRITE_ZEROES leaves ZERO (2);
// HOLE is never claimed, even without NO_HOLE.
std::optional<uint32_t> state_after(Mutation mutation);

}  // namespace bscache::policy
