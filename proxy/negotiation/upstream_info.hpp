// UpstreamInfo: what the upstream server negotiated (plain data, no libnbd).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace bscache::proxy {

// What upstream negotiated, learned once at start-up.
struct UpstreamInfo {
  uint64_t size = 0;
  bool read_only = false;
  bool can_flush = false, can_fua = false, can_trim = false, can_zero = false;
  bool can_fast_zero = false, can_cache = false, can_df = false, can_multi_conn = false;
  bool rotational = false;
  uint32_t min_block = 1, preferred_block = 4096, max_block = 32 * 1024 * 1024;
  bool advertises_block_size = false;  // upstream sent NBD_INFO_BLOCK_SIZE
  // Longest BLOCK_STATUS this connection sends in one request: what a 32-bit
  // length carries, unless extended headers were negotiated through a libnbd
  // that has nbd_aio_block_status_64 (then no limit but the export's size).
  uint64_t max_block_status_length = 0xffffffffu;
  // This connection's requests and replies use extended headers (32-byte,
  // 64-bit lengths): negotiated by libnbd (>= 1.18) or by bscache itself.
  bool extended_headers = false;
  std::string export_name;
  std::string description;
  std::vector<std::string> contexts;  // meta contexts negotiated upstream
};

// One export in a LIST reply (upstream's, or ours).
struct ExportListing {
  std::string name;
  std::string description;
};

// Upstream's answer to NBD_OPT_LIST: its exports, or the error it replied with.
struct UpstreamListing {
  std::vector<ExportListing> exports;
  uint32_t error = 0;   // the NBD_REP_ERR_* upstream replied with; 0: `exports` is its list
  std::string message;  // what upstream said with the error
  bool listed() const { return error == 0; }
};

}  // namespace bscache::proxy
