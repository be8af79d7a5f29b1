#include "proxy/exports/block_status_service.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <bit>
#include <cerrno>

#include "policy/alignment.hpp"

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

namespace {
// A client's context id on the wire: its index among the contexts it was offered, plus one.
uint32_t wire_context_id(uint32_t context) {
  return context + 1;
}

// The query upstream is asked: the client's, or for an unaligned query of a
// client that did not agree to upstream's block size, the whole blocks
// around it without REQ_ONE (whose one extent might end before the query
// starts), at most as long as one upstream request carries
// (`request_limit`). The answer is then cut back to the client's range
// (cut_descriptors).
wire::RequestHeader asked_upstream(const wire::RequestHeader& request, uint32_t align, uint64_t export_size,
                                   uint64_t request_limit) {
  if (policy::is_aligned({request.offset, request.length}, align, export_size)) return request;
  wire::RequestHeader asked = request;
  const auto blocks = policy::widen({request.offset, request.length}, align, export_size);
  asked.offset = blocks.offset;
  asked.length = std::min<uint64_t>(blocks.length, request_limit / align * align);
  asked.flags &= ~wire::kCmdFlagReqOne;
  return asked;
}

// Whether the request's answer has a chunk for the client's i-th selected context.
bool wanted(const wire::RequestHeader& request, size_t i) {
  return request.context_mask == 0 || (i < 64 && ((request.context_mask >> i) & 1) != 0);
}

// Whether the request is answered for base:allocation alone: the client
// selected only it, or its payload filter names only it.
bool base_allocation_alone(const BlockStatusClient& client, const wire::RequestHeader& request) {
  const auto base_allocation = static_cast<uint32_t>(client.offered->base_allocation);
  if (request.context_mask == 0) return client.selected.size() == 1 && client.selected[0] == base_allocation;
  if (!std::has_single_bit(request.context_mask)) return false;
  const auto i = static_cast<size_t>(std::countr_zero(request.context_mask));
  return i < client.selected.size() && client.selected[i] == base_allocation;
}

wire::ReplyForm reply_form(const BlockStatusClient& client, const wire::RequestHeader& request) {
  return {.extended = client.extended_headers, .request_offset = request.offset};
}

// One chunk of `descriptors` for a context, sized before it is encoded.
void add_chunk(wire::Bytes& chunks, const wire::ReplyForm& form, uint64_t cookie, bool done, uint32_t context,
               std::span<const wire::Descriptor> descriptors) {
  chunks.reserve(chunks.size() + (form.extended ? wire::kExtendedReplyHeaderSize + 8 + 16 * descriptors.size()
                                                : wire::kStructuredHeaderSize + 4 + 8 * descriptors.size()));
  wire::encode_block_status_chunk(chunks, cookie, done, wire_context_id(context), descriptors, form);
}
}  // namespace

std::optional<uint64_t> context_mask(const BlockStatusClient& client, std::span<const uint32_t> context_ids) {
  uint64_t mask = 0;
  for (const uint32_t id : context_ids) {
    // A client's context id is the offered context's index + 1 (wire_context_id).
    const auto selected = std::find(client.selected.begin(), client.selected.end(), id - 1);
    if (id == 0 || selected == client.selected.end()) return std::nullopt;
    const auto index = static_cast<size_t>(selected - client.selected.begin());
    if (index >= 64) return std::nullopt;
    const uint64_t bit = uint64_t{1} << index;
    if (mask & bit) return std::nullopt;
    mask |= bit;
  }
  if (mask == 0) return std::nullopt;
  const uint64_t all = client.selected.size() >= 64 ? ~uint64_t{0} : (uint64_t{1} << client.selected.size()) - 1;
  return mask == all ? 0 : mask;
}

// base:allocation alone, which upstream can tell and the cache keeps.
bool BlockStatusService::answers_from_cache(const BlockStatusClient& client, const wire::RequestHeader& request) const {
  return caching() && base_allocation_alone(client, request) &&
         client.offered->upstream_context(static_cast<size_t>(client.offered->base_allocation));
}

bool BlockStatusService::try_answer(const BlockStatusClient& client, const wire::RequestHeader& request,
                                    wire::Bytes& chunks) {
  const ExportInfo& offered = *client.offered;
  const auto base_allocation = static_cast<uint32_t>(offered.base_allocation);
  if (!base_allocation_alone(client, request)) return false;
  // Upstream cannot tell (it lacked base:allocation when this client came,
  // or lost it in a reconnect since): everything is data, always a safe answer.
  const bool upstream_tells =
      offered.upstream_context(base_allocation) && info_.upstream_context(static_cast<size_t>(info_.base_allocation));
  if (!upstream_tells) {
    hit_.assign(1, wire::Descriptor{request.length, 0});
  } else if (caching() && lookup(request.offset, request.length, request.flags & wire::kCmdFlagReqOne, hit_)) {
    maybe_prefetch(request.offset);
  } else {
    return false;
  }
  ++metrics_.block_status_hits;
  add_chunk(chunks, reply_form(client, request), request.cookie, true, base_allocation, hit_);
  return true;
}

awaitable<BlockStatusReply> BlockStatusService::answer(BlockStatusClient client, wire::RequestHeader request) {
  ++metrics_.block_status_misses;
  const wire::RequestHeader asked =
      asked_upstream(request, client.align, client.offered->size, info_.max_block_status_length);
  if (!answers_from_cache(client, request)) co_return co_await pass_through(client, request, asked);
  BlockStatusReply reply;
  std::vector<wire::Descriptor> descriptors;
  reply.error = co_await answer_after_miss(asked.offset, asked.length, asked.flags & wire::kCmdFlagReqOne, descriptors);
  if (reply.error) co_return reply;
  std::vector<wire::Descriptor> cut;
  const bool widened = asked.offset != request.offset || asked.length != request.length;
  if (widened) {
    wire::cut_descriptors(descriptors, request.offset - asked.offset, request.length,
                          request.flags & wire::kCmdFlagReqOne, cut);
  }
  const auto& answered = widened ? cut : descriptors;
  add_chunk(reply.chunks, reply_form(client, request), request.cookie, true,
            static_cast<uint32_t>(client.offered->base_allocation), answered);
  co_return reply;
}

// Contexts other than base:allocation are never cached: one upstream call
// answers every context the client selected that upstream has (those its
// filter names, if it sent one), each translated to the client's context id;
// base:allocation where upstream lacks it is all data. A query longer than
// one upstream request carries (an extended-headers client's) is answered
// for what that covers, which the spec allows.
awaitable<BlockStatusReply> BlockStatusService::pass_through(const BlockStatusClient& client,
                                                             const wire::RequestHeader& request,
                                                             const wire::RequestHeader& asked) {
  const ExportInfo& offered = *client.offered;
  auto result = co_await upstream_.block_status(asked.offset, upstream_length(asked.length),
                                                {.req_one = (asked.flags & wire::kCmdFlagReqOne) != 0});
  BlockStatusReply reply;
  if (result.error) {
    reply.error = result.error;  // the pool logged and counted it
    co_return reply;
  }
  const wire::ReplyForm form = reply_form(client, request);
  size_t last = client.selected.size();  // one past the last context answered: its chunk ends the reply
  while (last > 0 && !wanted(request, last - 1)) --last;
  std::vector<wire::Descriptor> descriptors;
  for (size_t i = 0; i < last; ++i) {
    if (!wanted(request, i)) continue;
    const uint32_t context = client.selected[i];
    descriptors.clear();
    if (offered.upstream_context(context)) {
      if (const auto* answered = result.extents_for(offered.contexts[context])) {
        // Cut to the client's range (which `asked` may have widened).
        wire::cut_descriptors(*answered, request.offset - asked.offset, request.length,
                              request.flags & wire::kCmdFlagReqOne, descriptors);
      }
    } else {
      descriptors.push_back({request.length, 0});  // base:allocation synthesized: all data
    }
    if (descriptors.empty()) {
      reply.error = EIO;
      reply.message = "upstream sent no extents for a selected context";
      co_return reply;
    }
    add_chunk(reply.chunks, form, request.cookie, i + 1 == last, context, descriptors);
  }
  co_return reply;
}

awaitable<int> BlockStatusService::answer_after_miss(uint64_t offset, uint64_t length, bool req_one,
                                                     std::vector<wire::Descriptor>& out) {
  auto fetch = joinable_fetch(offset);
  if (!fetch) {
    if (policy::should_bypass(cache_.extents().max_extents())) {
      co_return co_await forward_unchanged(offset, length, req_one, out);
    }
    fetch = start_fetch(
        policy::window_for_miss(offset, length, req_one, planned_window(offset), info_.max_block_status_length), false);
  }
  while (!fetch->finished) co_await fetch->done.wait();
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
  return policy::plan_fetch(offset, info_.size, info_.min_block, bytes, config_.limits.allocation_granularity,
                            info_.max_block_status_length);
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

uint64_t BlockStatusService::upstream_length(uint64_t length) const {
  const uint64_t block = std::max<uint32_t>(info_.min_block, 1);
  return std::min(length, info_.max_block_status_length / block * block);
}

// A query longer than one upstream request carries (an extended-headers
// client's, upstream without extended headers) is answered for what that covers.
awaitable<int> BlockStatusService::ask_upstream_directly(uint64_t offset, uint64_t length, bool req_one,
                                                         std::vector<wire::Descriptor>& out) {
  const uint64_t asked = upstream_length(length);
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
  fetch->done.notify();
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
