// BlockStatusService: a client's BLOCK_STATUS enters here and leaves answered.
// base:allocation is answered from the shared cache, fetching large windows
// upstream on a miss (one fetch per window however many clients wait on it)
// and prefetching ahead of sequential scans; other contexts are asked upstream
// each time; base:allocation on an upstream that lacks it is all data. The
// answer carries the client's context ids, cut to the client's range, in the
// chunks the client negotiated: BLOCK_STATUS, or with extended headers
// BLOCK_STATUS_EXT (64-bit extents) answering only the contexts its payload
// filter names, if it sent one (RequestHeader::context_mask).
//
// Mutations that pass through call begin_mutation()/end_mutation() around the
// upstream command so the cache never keeps a state the write may have changed.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "cache/coherent_cache.hpp"
#include "policy/capacity.hpp"
#include "policy/coherence.hpp"
#include "policy/fetch_window.hpp"
#include "policy/prefetch.hpp"
#include "proxy/exports/config.hpp"
#include "proxy/io/asio.hpp"
#include "proxy/io/loop_signal.hpp"
#include "proxy/negotiation/export_info.hpp"
#include "proxy/ops/metrics.hpp"
#include "proxy/upstream/block_status_upstream.hpp"
#include "proxy/wire/codec.hpp"

namespace bscache::proxy {

// One client's side of BLOCK_STATUS, fixed when it chose the export (a
// reconnect changes what new clients are offered, not what this one agreed to).
struct BlockStatusClient {
  const ExportInfo* offered = nullptr;  // what it was offered: its context ids index offered->contexts
  std::span<const uint32_t> selected;   // the meta contexts it selected, in the order their chunks are sent
  // Upstream's minimum block size when the client did not agree to it (its
  // queries are asked upstream as whole blocks), else 1.
  uint32_t align = 1;
  // NBD_OPT_EXTENDED_HEADERS: extended reply headers and BLOCK_STATUS_EXT
  // chunks, whose extents may be longer than 4 GiB.
  bool extended_headers = false;
};

// The RequestHeader::context_mask for a BLOCK_STATUS payload filter naming
// `context_ids`: bit i for the client's i-th selected context, 0 when it
// names all of them (the same as no filter, and the cache's fast path
// applies). nullopt if an id is not one the client selected, or is named
// twice (the spec: EINVAL). The client selected at most 64 contexts
// (kMaxFilterableContexts: only then is it offered filtering).
std::optional<uint64_t> context_mask(const BlockStatusClient& client, std::span<const uint32_t> context_ids);

// A BLOCK_STATUS answered: the reply's chunks, or why it failed.
struct BlockStatusReply {
  wire::Bytes chunks;
  int error = 0;             // an errno; 0: `chunks` is the reply
  std::string_view message;  // what to tell the client instead of strerror(error); empty: strerror
};

class BlockStatusService {
 public:
  BlockStatusService(asio::io_context& io, BlockStatusUpstream& upstream, const ExportInfo& info,
                     const BlockStatusConfig& config, Metrics& metrics);

  bool caching() const { return config_.coherence.mode != policy::CoherenceMode::Off; }

  // Fast path, on the hit path of every BLOCK_STATUS: encodes the reply into
  // `chunks` when it needs no upstream call (a cache hit, or base:allocation
  // that bscache synthesizes) and returns true. False: call answer().
  bool try_answer(const BlockStatusClient& client, const wire::RequestHeader& request, wire::Bytes& chunks);
  // Slow path: a cache miss, or contexts passed through to upstream.
  awaitable<BlockStatusReply> answer(BlockStatusClient client, wire::RequestHeader request);

  using Ticket = cache::CoherentCache::Ticket;
  Ticket begin_mutation(uint64_t offset, uint64_t length);
  void end_mutation(Ticket ticket, uint64_t offset, uint64_t length, policy::Mutation kind, bool succeeded);

  // Forget everything (upstream may have changed under us).
  void clear();
  CacheGauges gauges() const;

 private:
  struct Fetch {
    explicit Fetch(asio::io_context& io) : done(io) {}
    uint64_t offset = 0;
    uint64_t length = 0;
    bool prefetch = false;
    bool finished = false;
    int error = 0;
    size_t store_limit = 0;             // most extents of the reply the cache keeps
    cache::TimePoint sent;              // when its ticket was taken (its creation until then)
    std::vector<cache::Extent> usable;  // the reply outside its taint: answers whoever waited
    LoopSignal done;                    // notified when the fetch finishes
  };
  struct Window {
    uint64_t end = 0;
    bool prefetched = false;  // fetched ahead and not yet used by a client
  };

  bool answers_from_cache(const BlockStatusClient& client, const wire::RequestHeader& request) const;
  awaitable<int> answer_after_miss(uint64_t offset, uint64_t length, bool req_one, std::vector<wire::Descriptor>& out);
  awaitable<BlockStatusReply> pass_through(const BlockStatusClient& client, const wire::RequestHeader& request,
                                           const wire::RequestHeader& asked);
  std::shared_ptr<Fetch> fetch_covering(uint64_t offset) const;
  std::shared_ptr<Fetch> joinable_fetch(uint64_t offset) const;
  std::shared_ptr<Fetch> start_fetch(policy::FetchWindow window, bool prefetch);
  awaitable<void> run_fetch(std::shared_ptr<Fetch> fetch);
  void note_window(uint64_t start, uint64_t end, bool prefetch);
  void maybe_prefetch(uint64_t offset);
  bool lookup(uint64_t offset, uint64_t length, bool req_one, std::vector<wire::Descriptor>& out);
  bool answer_from(const Fetch& fetch, uint64_t offset, uint64_t length, bool req_one,
                   std::vector<wire::Descriptor>& out);
  awaitable<int> forward_unchanged(uint64_t offset, uint64_t length, bool req_one, std::vector<wire::Descriptor>& out);
  unsigned prefetch_depth() const;
  size_t window_budget() const;
  policy::FetchWindow planned_window(uint64_t offset) const;
  // The longest part of a query of `length` bytes that one upstream request
  // carries (ExportInfo::max_block_status_length), in whole blocks.
  uint64_t upstream_length(uint64_t length) const;
  awaitable<int> ask_upstream_directly(uint64_t offset, uint64_t length, bool req_one,
                                       std::vector<wire::Descriptor>& out);

  asio::io_context& io_;
  BlockStatusUpstream& upstream_;
  const ExportInfo& info_;
  BlockStatusConfig config_;
  Metrics& metrics_;
  cache::CoherentCache cache_;
  policy::LatencyEstimator latency_;
  policy::DensityEstimator density_;
  bool bypass_logged_ = false;
  std::map<uint64_t, std::shared_ptr<Fetch>> fetches_;  // in flight, by start offset
  std::map<uint64_t, Window> windows_;                  // fetched windows, by start offset
  std::vector<cache::Extent> scratch_;                  // reused by lookups: no allocation on a hit
  std::vector<wire::Descriptor> hit_;                   // reused by hits: their descriptors before encoding
};

}  // namespace bscache::proxy
