// ExportInfo: what bscache advertises to its clients, derived once from what
// upstream negotiated and the command line.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "proxy/negotiation/upstream_info.hpp"

namespace bscache::proxy {

struct ExportInfo {
  std::string name;
  std::string description;
  uint64_t size = 0;
  uint16_t tx_flags = 0;
  uint32_t min_block = 1;
  uint32_t preferred_block = 4096;
  uint32_t max_block = 32 * 1024 * 1024;
  bool advertise_block_size = false;  // mirror upstream: only if it sent them
  // Meta contexts offered to clients; a client's context id is index + 1.
  std::vector<std::string> contexts;
  // For each offered context, its index among upstream's contexts, or -1 for
  // base:allocation synthesized locally when upstream lacks it.
  std::vector<int> upstream_index;
  int base_allocation = -1;  // index into contexts (always present)
  // Longest block-status window upstream answers in one request (what the
  // upstream connection can do: UpstreamInfo::max_block_status_length).
  uint64_t max_block_status_length = 0xffffffffu;

  bool operator==(const ExportInfo&) const = default;

  // The upstream context behind offered context `context`; nullopt when
  // bscache synthesizes it (base:allocation on an upstream that lacks it).
  std::optional<size_t> upstream_context(size_t context) const {
    const int index = upstream_index[context];
    return index < 0 ? std::nullopt : std::optional<size_t>(static_cast<size_t>(index));
  }
};

// Largest READ/WRITE payload we accept from a client, whatever upstream says.
inline constexpr uint32_t kMaxPayload = 32 * 1024 * 1024;

ExportInfo make_export_info(const UpstreamInfo& upstream, bool force_read_only);

// Contexts matching one query: exact names, or a namespace prefix ending in ':'
// ("base:", "qemu:dirty-bitmap:") when `allow_prefix` (LIST_META_CONTEXT only).
std::vector<uint32_t> match_contexts(const ExportInfo& info, std::string_view query, bool allow_prefix);

}  // namespace bscache::proxy
