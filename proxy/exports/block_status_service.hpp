// BlockStatusService: answers base:allocation queries from the shared cache,
// fetching large windows upstream on a miss (one fetch per window however many
// clients wait on it) and prefetching ahead of sequential scans.
//
// Mutations that pass through call begin_mutation()/end_mutation() around the
// upstream command so the cache never keeps a state the write may have changed.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <vector>

#include "cache/coherent_cache.hpp"
#include "policy/capacity.hpp"
#include "policy/coherence.hpp"
#include "policy/fetch_window.hpp"
#include "policy/prefetch.hpp"
#include "proxy/io/asio.hpp"
#include "proxy/negotiation/export_info.hpp"
#include "proxy/ops/metrics.hpp"
#include "proxy/upstream/block_status_upstream.hpp"

namespace bscache::proxy {

struct BlockStatusConfig {
  policy::CoherencePolicy coherence;
  policy::PrefetchConfig prefetch;
  cache::CacheLimits limits;
  // Longest window asked for on a miss. Default: the 32-bit limit.
  uint64_t max_window = policy::kMaxRequestLength;
  // Most descriptors in one reply without REQ_ONE. Default: 65536.
  size_t max_descriptors = 65536;
};

class BlockStatusService {
 public:
  BlockStatusService(asio::io_context& io, BlockStatusUpstream& upstream, const ExportInfo& info,
                     const BlockStatusConfig& config, Metrics& metrics);

  bool caching() const { return config_.coherence.mode != policy::CoherenceMode::Off; }

  // Fast path: fills `out` from the cache without waiting. False on a miss.
  bool try_answer(uint64_t offset, uint64_t length, bool req_one, std::vector<wire::Descriptor>& out);
  // Slow path after a miss: fetches and answers. Returns an errno (0 on success).
  awaitable<int> answer_after_miss(uint64_t offset, uint64_t length, bool req_one, std::vector<wire::Descriptor>& out);

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
    asio::steady_timer done;            // cancelled when the fetch finishes
  };
  struct Window {
    uint64_t end = 0;
    bool prefetched = false;  // fetched ahead and not yet used by a client
  };

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
};

}  // namespace bscache::proxy
