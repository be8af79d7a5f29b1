#include "proxy/negotiation/export_info.hpp"

#include <algorithm>

#include "proxy/wire/protocol.hpp"

namespace bscache::proxy {

ExportInfo make_export_info(const UpstreamInfo& up, bool force_read_only) {
  using namespace wire;
  ExportInfo info;
  info.name = up.export_name;
  info.description = up.description;
  info.size = up.size;
  info.min_block = up.min_block;
  info.preferred_block = up.preferred_block;
  info.max_block = std::min(up.max_block, kMaxPayload);
  info.advertise_block_size = up.advertises_block_size;
  info.max_block_status_length = up.max_block_status_length;
  const bool read_only = force_read_only || up.read_only;
  uint16_t f = kTxHasFlags;
  if (read_only) f |= kTxReadOnly;
  if (up.can_flush) f |= kTxSendFlush;
  if (up.can_fua) f |= kTxSendFua;
  if (up.rotational) f |= kTxRotational;
  if (up.can_trim && !read_only) f |= kTxSendTrim;
  if (up.can_zero && !read_only) f |= kTxSendWriteZeroes;
  if (up.can_df) f |= kTxSendDf;
  if (up.can_cache) f |= kTxSendCache;
  if (up.can_fast_zero && up.can_zero && !read_only) f |= kTxSendFastZero;
  // All clients of an export share its upstream connections and one cache,
  // and a FLUSH from any client reaches every upstream connection that
  // carried writes since its last flush (UpstreamPool fans it out): every
  // client sees the same state, and a flush makes every completed write
  // durable. So multi-conn holds.
  f |= kTxCanMultiConn;
  info.tx_flags = f;

  for (size_t i = 0; i < up.contexts.size(); ++i) {
    info.contexts.push_back(up.contexts[i]);
    info.upstream_index.push_back(static_cast<int>(i));
  }
  auto it = std::find(info.contexts.begin(), info.contexts.end(), kBaseAllocation);
  if (it == info.contexts.end()) {
    info.contexts.insert(info.contexts.begin(), kBaseAllocation);
    info.upstream_index.insert(info.upstream_index.begin(), -1);
    info.base_allocation = 0;
  } else {
    info.base_allocation = static_cast<int>(it - info.contexts.begin());
  }
  return info;
}

std::vector<uint32_t> match_contexts(const ExportInfo& info, std::string_view query, bool allow_prefix) {
  std::vector<uint32_t> out;
  const bool prefix = allow_prefix && !query.empty() && query.back() == ':';
  for (size_t i = 0; i < info.contexts.size(); ++i) {
    std::string_view name = info.contexts[i];
    if (prefix ? name.starts_with(query) : name == query) out.push_back(static_cast<uint32_t>(i));
  }
  return out;
}

}  // namespace bscache::proxy
