// BlockStatusService: a client's BLOCK_STATUS enters here and leaves answered.
// Every meta context whose meaning bscache knows (base:allocation,
// qemu:allocation-depth, qemu:dirty-bitmap:NAME; policy/meta_context.hpp) is
// answered from the cache, one per (export, context) under the one budget,
// fetching large windows upstream on a miss (one fetch per window however
// many clients wait on it, and one upstream call fills the window of every
// context a client asked about so far: upstream answers them all at once)
// and prefetching ahead of sequential scans. A query naming any other
// context is asked upstream as it came; base:allocation on an upstream that
// lacks it is all data. The
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
#include <string>
#include <string_view>
#include <vector>

#include "cache/coherent_cache.hpp"
#include "policy/capacity.hpp"
#include "policy/coherence.hpp"
#include "policy/fetch_window.hpp"
#include "policy/meta_context.hpp"
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
  // A meta context clients asked about, by upstream's name (a reconnect may
  // renumber upstream's contexts, never rename one). Entries are never
  // removed: their indices stay valid across a coroutine's suspension.
  struct ContextEntry {
    std::string name;
    policy::ContextKind kind = policy::ContextKind::Unknown;
    std::optional<size_t> slot;           // its context in cache_; nullopt: never cached
    bool queried = false;                 // a client asked about it: every fetch stores it
    policy::BitmapGranularity bitmap;     // dirty bitmaps: their granules, as replies tell
    ContextCounters* counters = nullptr;  // metrics_.contexts[name]
  };
  // How one context a request wants is answered.
  struct Source {
    uint32_t context = 0;      // the client's context (index into its offered contexts)
    size_t entry = 0;          // into contexts_
    bool synthesized = false;  // base:allocation upstream cannot tell: all data
  };
  struct Fetch {
    explicit Fetch(asio::io_context& io) : done(io) {}
    uint64_t offset = 0;
    uint64_t length = 0;
    bool prefetch = false;
    bool finished = false;
    int error = 0;
    size_t store_limit = 0;  // most extents of the reply the cache keeps
    cache::TimePoint sent;   // when its ticket was taken (its creation until then)
    // The reply outside its taint, by entry (empty where upstream sent none):
    // answers whoever waited.
    std::vector<std::vector<cache::Extent>> usable;
    LoopSignal done;  // notified when the fetch finishes
  };
  struct Window {
    uint64_t end = 0;
    bool prefetched = false;  // fetched ahead and not yet used by a client
  };

  using Answers = std::vector<std::vector<wire::Descriptor>>;  // one per entry asked about
  size_t entry_for(const std::string& name);
  // The contexts `request` wants, in the client's order, into `out`; false
  // if one of them is not answered from the cache (pass the query through).
  bool resolve(const BlockStatusClient& client, const wire::RequestHeader& request, std::vector<Source>& out);
  awaitable<int> answer_after_miss(uint64_t offset, uint64_t length, bool req_one, std::vector<size_t> entries,
                                   Answers& out);
  awaitable<BlockStatusReply> pass_through(const BlockStatusClient& client, const wire::RequestHeader& request,
                                           const wire::RequestHeader& asked, const std::vector<Source>& sources);
  std::shared_ptr<Fetch> fetch_covering(uint64_t offset) const;
  std::shared_ptr<Fetch> joinable_fetch(uint64_t offset) const;
  std::shared_ptr<Fetch> start_fetch(policy::FetchWindow window, bool prefetch);
  awaitable<void> run_fetch(std::shared_ptr<Fetch> fetch);
  void learn_bitmap_granularity(ContextEntry& entry, uint64_t start, const std::vector<wire::Descriptor>& reply);
  void note_window(uint64_t start, uint64_t end, bool prefetch);
  void maybe_prefetch(uint64_t offset);
  bool lookup(size_t entry, uint64_t offset, uint64_t length, bool req_one, std::vector<wire::Descriptor>& out);
  bool answer_from(const Fetch& fetch, size_t entry, uint64_t offset, uint64_t length, bool req_one,
                   std::vector<wire::Descriptor>& out);
  awaitable<int> forward_unchanged(uint64_t offset, uint64_t length, bool req_one, const std::vector<size_t>& entries,
                                   Answers& out);
  unsigned prefetch_depth() const;
  size_t window_budget() const;
  policy::FetchWindow planned_window(uint64_t offset) const;
  // The longest part of a query of `length` bytes that one upstream request
  // carries (ExportInfo::max_block_status_length), in whole blocks.
  uint64_t upstream_length(uint64_t length) const;
  awaitable<int> ask_upstream_directly(uint64_t offset, uint64_t length, bool req_one,
                                       const std::vector<size_t>& entries, Answers& out);

  asio::io_context& io_;
  BlockStatusUpstream& upstream_;
  const ExportInfo& info_;
  BlockStatusConfig config_;
  Metrics& metrics_;
  cache::CoherentCache cache_;
  std::vector<ContextEntry> contexts_;  // [0] is base:allocation, cache_'s context 0
  policy::LatencyEstimator latency_;
  policy::DensityEstimator density_;
  bool bypass_logged_ = false;
  std::map<uint64_t, std::shared_ptr<Fetch>> fetches_;  // in flight, by start offset
  std::map<uint64_t, Window> windows_;                  // fetched windows, by start offset
  std::vector<cache::Extent> scratch_;                  // reused by lookups: no allocation on a hit
  std::vector<wire::Descriptor> hit_;                   // reused by hits: their descriptors before encoding
  std::vector<Source> sources_;                         // reused by hits: the contexts asked about
};

}  // namespace bscache::proxy
