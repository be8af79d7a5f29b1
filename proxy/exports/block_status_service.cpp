#include "proxy/exports/block_status_service.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <boost/asio/redirect_error.hpp>

namespace bscache::proxy {

namespace {
constexpr size_t kMaxRememberedWindows = 4096;
// Answers taken from a fetch reply carry as many descriptors as upstream sent
// for the range, up to the protocol's limit for one chunk (NBD-NOTES).
constexpr size_t kMaxReplyDescriptors = (size_t{1} << 20) - 1;

cache::CacheLimits limits_for(const BlockStatusConfig& config) {
  cache::CacheLimits limits = config.limits;
  if (config.coherence.mode == policy::CoherenceMode::Ttl) limits.ttl = config.coherence.ttl;
  return limits;
}
}  // namespace

BlockStatusService::BlockStatusService(asio::io_context& io, BlockStatusUpstream& upstream, const ExportInfo& info,
                                       const BlockStatusConfig& config, Metrics& metrics)
    : io_(io), upstream_(upstream), info_(info), config_(config), metrics_(metrics), cache_(limits_for(config)) {
  scratch_.reserve(config_.max_descriptors);
  if (caching()) {
    spdlog::info("cache holds at most {} extents (about {} MiB), shared by every export",
                 cache_.extents().max_extents(),
                 cache_.extents().max_extents() * (cache::kBytesPerInterval + cache::kBytesPerSegment) >> 20);
  }
}

bool BlockStatusService::try_answer(uint64_t offset, uint64_t length, bool req_one,
                                    std::vector<wire::Descriptor>& out) {
  if (!info_.upstream_context(static_cast<size_t>(info_.base_allocation))) {
    // Upstream cannot tell: everything is data, which is always a safe answer.
    out.assign(1, wire::Descriptor{length, 0});
    return true;
  }
  if (!caching() || !lookup(offset, length, req_one, out)) return false;
  maybe_prefetch(offset);
  return true;
}

awaitable<int> BlockStatusService::answer_after_miss(uint64_t offset, uint64_t length, bool req_one,
                                                     std::vector<wire::Descriptor>& out) {
  if (!caching()) {
    co_return co_await ask_upstream_directly(offset, length, req_one, out);
  }
  auto fetch = joinable_fetch(offset);
  if (!fetch) {
    if (policy::should_bypass(cache_.extents().max_extents())) {
      co_return co_await forward_unchanged(offset, length, req_one, out);
    }
    fetch = start_fetch(policy::window_for_miss(offset, length, req_one, planned_window(offset)), false);
  }
  while (!fetch->finished) {
    boost::system::error_code ignored;  // cancellation is the "finished" signal
    co_await fetch->done.async_wait(asio::redirect_error(use_awaitable, ignored));
  }
  // The reply answers its waiters even if it was not stored (too old for the
  // TTL, more than the cache can hold, or evicted since), as a pass-through
  // would have: a miss never costs more than one upstream call. The cache may
  // know the offset when the reply does not (a write completed there).
  if (!fetch->error && (answer_from(*fetch, offset, length, req_one, out) || lookup(offset, length, req_one, out))) {
    maybe_prefetch(offset);
    co_return 0;
  }
  // The fetch failed (e.g. upstream refuses long windows) or a write racing
  // it left this offset unknown: ask for exactly this request.
  co_return co_await ask_upstream_directly(offset, length, req_one, out);
}

awaitable<int> BlockStatusService::forward_unchanged(uint64_t offset, uint64_t length, bool req_one,
                                                     std::vector<wire::Descriptor>& out) {
  if (!bypass_logged_) {
    bypass_logged_ = true;
    spdlog::warn(
        "the cache holds at most {} extents, too few to keep a window of {} beside the one being read: "
        "block-status misses are forwarded upstream as they come (see cache.bypassed)",
        cache_.extents().max_extents(), policy::kMinWindowExtents);
  }
  ++metrics_.cache_bypassed;
  co_return co_await ask_upstream_directly(offset, length, req_one, out);
}

unsigned BlockStatusService::prefetch_depth() const {
  if (!config_.prefetch.enabled) return 0;
  return policy::affordable_depth(cache_.extents().planning_share(),
                                  policy::prefetch_depth(config_.prefetch, latency_.estimate()));
}

size_t BlockStatusService::window_budget() const {
  return policy::window_extent_budget(cache_.extents().planning_share(), prefetch_depth());
}

policy::FetchWindow BlockStatusService::planned_window(uint64_t offset) const {
  const uint64_t bytes = policy::window_bytes(window_budget(), density_.bytes_per_extent(), config_.max_window);
  return policy::plan_fetch(offset, info_.size, info_.min_block, bytes, config_.limits.allocation_granularity);
}

bool BlockStatusService::lookup(uint64_t offset, uint64_t length, bool req_one, std::vector<wire::Descriptor>& out) {
  scratch_.clear();
  if (cache_.extents().lookup(offset, length, scratch_, req_one ? 1 : config_.max_descriptors) == 0) return false;
  out.clear();
  for (const auto& e : scratch_) out.push_back({e.length, e.flags});
  return true;
}

bool BlockStatusService::answer_from(const Fetch& fetch, uint64_t offset, uint64_t length, bool req_one,
                                     std::vector<wire::Descriptor>& out) {
  scratch_.clear();
  if (cache::lookup_run(fetch.usable, offset, length, scratch_, req_one ? 1 : kMaxReplyDescriptors) == 0) {
    return false;
  }
  out.clear();
  for (const auto& e : scratch_) out.push_back({e.length, e.flags});
  return true;
}

awaitable<int> BlockStatusService::ask_upstream_directly(uint64_t offset, uint64_t length, bool req_one,
                                                         std::vector<wire::Descriptor>& out) {
  // Upstream takes at most a 32-bit length (libnbd 1.14): a longer query
  // (an extended-headers client's) is answered for what that covers.
  const uint64_t block = std::max<uint32_t>(info_.min_block, 1);
  const uint64_t asked = std::min(length, policy::kMaxRequestLength / block * block);
  auto result = co_await upstream_.block_status(offset, asked, {.req_one = req_one});
  if (result.error) co_return result.error;  // the pool logged and counted it
  out.clear();
  if (const auto* descriptors = result.extents_for(wire::kBaseAllocation)) {
    wire::clip_descriptors(*descriptors, asked, req_one, out);
  }
  co_return out.empty() ? EIO : 0;
}

std::shared_ptr<BlockStatusService::Fetch> BlockStatusService::fetch_covering(uint64_t offset) const {
  auto it = fetches_.upper_bound(offset);
  if (it == fetches_.begin()) return nullptr;
  --it;
  const auto& f = it->second;
  return offset < f->offset + f->length ? f : nullptr;
}

std::shared_ptr<BlockStatusService::Fetch> BlockStatusService::joinable_fetch(uint64_t offset) const {
  auto fetch = fetch_covering(offset);
  // Under a TTL a query may wait on a fetch only if it was sent at most the
  // TTL ago: its reply describes upstream no earlier than that.
  if (fetch && !config_.coherence.fresh(cache_.extents().now() - fetch->sent)) return nullptr;
  return fetch;
}

std::shared_ptr<BlockStatusService::Fetch> BlockStatusService::start_fetch(policy::FetchWindow window, bool prefetch) {
  auto fetch = std::make_shared<Fetch>(io_);
  fetch->offset = window.offset;
  fetch->length = window.length;
  fetch->prefetch = prefetch;
  fetch->sent = cache_.extents().now();
  fetch->store_limit = window_budget();
  fetch->done.expires_at(asio::steady_timer::time_point::max());
  fetches_[window.offset] = fetch;
  // Detached: a fetch outlives the client that caused it, others may wait on it.
  asio::co_spawn(io_, run_fetch(fetch), asio::detached);
  return fetch;
}

awaitable<void> BlockStatusService::run_fetch(std::shared_ptr<Fetch> fetch) {
  // The ticket is taken in the same step that sends the command: any mutation
  // in flight now, or begun before the reply, taints what the reply says.
  auto ticket = cache_.begin_fetch();
  fetch->sent = ticket.sent;
  const auto started = std::chrono::steady_clock::now();
  auto result = co_await upstream_.block_status(fetch->offset, fetch->length, {});
  latency_.record(std::chrono::steady_clock::now() - started);
  const auto* descriptors = result.error ? nullptr : result.extents_for(wire::kBaseAllocation);
  if (!result.error && !descriptors) result.error = EIO;  // upstream changed its contexts
  if (result.error) {
    cache_.abort_fetch(ticket);  // the pool logged and counted it
    fetch->error = result.error;
  } else {
    std::vector<cache::Extent> extents;
    extents.reserve(descriptors->size());
    uint64_t pos = fetch->offset;
    for (const auto& d : *descriptors) {
      extents.push_back({pos, d.length, d.flags});
      pos += d.length;
    }
    const uint64_t end = std::min(info_.size, fetch->offset + fetch->length);
    density_.record(descriptors->size(), std::min(pos, end) - std::min(fetch->offset, end));
    auto outcome = cache_.complete_fetch(ticket, extents, end, fetch->store_limit);
    fetch->usable = std::move(outcome.usable);
    if (outcome.stored > 0) note_window(fetch->offset, fetch->usable[outcome.stored - 1].end(), fetch->prefetch);
    spdlog::debug("fetched {} extents for {}+{}{}", descriptors->size(), fetch->offset, fetch->length,
                  fetch->prefetch ? " (prefetch)" : "");
  }
  fetch->finished = true;
  if (auto it = fetches_.find(fetch->offset); it != fetches_.end() && it->second == fetch) fetches_.erase(it);
  fetch->done.cancel();
}

void BlockStatusService::note_window(uint64_t start, uint64_t end, bool prefetch) {
  windows_[start] = Window{end, prefetch};
  if (windows_.size() > kMaxRememberedWindows) windows_.erase(windows_.begin());
}

void BlockStatusService::maybe_prefetch(uint64_t offset) {
  if (!config_.prefetch.enabled) return;
  auto it = windows_.upper_bound(offset);
  if (it == windows_.begin()) return;
  --it;
  Window& window = it->second;
  if (offset >= window.end) return;
  if (window.prefetched) {
    window.prefetched = false;
    ++metrics_.prefetches_used;
  }
  if (!policy::should_prefetch(offset, it->first, window.end, info_.size)) return;
  const unsigned depth = prefetch_depth();
  unsigned allowance = policy::prefetch_allowance(depth, upstream_calls_saved(metrics_));
  uint64_t pos = window.end;
  for (unsigned i = 0; i < depth && allowance > 0 && pos < info_.size; ++i) {
    if (auto f = fetch_covering(pos)) {
      pos = f->offset + f->length;
      continue;
    }
    if (auto next = windows_.find(pos); next != windows_.end() && next->second.end > pos) {
      pos = next->second.end;
      continue;
    }
    const auto planned = planned_window(pos);
    if (planned.length == 0) break;
    start_fetch(planned, true);
    ++metrics_.prefetches_issued;
    --allowance;
    pos = planned.offset + planned.length;
  }
}

BlockStatusService::Ticket BlockStatusService::begin_mutation(uint64_t offset, uint64_t length) {
  ++metrics_.ranges_invalidated;
  return cache_.begin_mutation(offset, length);
}

void BlockStatusService::end_mutation(Ticket ticket, uint64_t offset, uint64_t length, policy::Mutation kind,
                                      bool succeeded) {
  std::optional<uint32_t> state;
  if (succeeded && caching()) state = policy::state_after(kind);
  cache_.complete_mutation(ticket, offset, length, state);
  if (state) ++metrics_.ranges_updated;
}

void BlockStatusService::clear() {
  cache_.clear();
  windows_.clear();
}

CacheGauges BlockStatusService::gauges() const {
  const auto& e = cache_.extents();
  return {e.extent_count(), e.memory_bytes(), e.evictions(), e.expirations(), e.max_extents()};
}

}  // namespace bscache::proxy
