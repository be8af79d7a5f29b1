#include "proxy/exports/block_status_service.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>
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
  entry_for(std::string(wire::kBaseAllocation));  // cache_'s context 0
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

size_t BlockStatusService::entry_for(const std::string& name) {
  for (size_t i = 0; i < contexts_.size(); ++i) {
    if (contexts_[i].name == name) return i;
  }
  ContextEntry entry;
  entry.name = name;
  entry.kind = policy::context_kind(name);
  entry.counters = &metrics_.contexts[name];
  if (entry.kind == policy::ContextKind::BaseAllocation) {
    entry.slot = 0;
  } else if (policy::cacheable(entry.kind)) {
    entry.slot = cache_.add_context(config_.limits.allocation_granularity, policy::remembers_mutations(entry.kind));
    if (entry.kind == policy::ContextKind::DirtyBitmap) {
      cache_.set_granularity(*entry.slot, std::max(config_.limits.allocation_granularity, entry.bitmap.bound()));
    }
  }
  contexts_.push_back(std::move(entry));
  return contexts_.size() - 1;
}

bool BlockStatusService::resolve(const BlockStatusClient& client, const wire::RequestHeader& request,
                                 std::vector<Source>& out) {
  const ExportInfo& offered = *client.offered;
  out.clear();
  bool cached = true;
  for (size_t i = 0; i < client.selected.size(); ++i) {
    if (!wanted(request, i)) continue;
    const uint32_t context = client.selected[i];
    Source source{.context = context, .entry = entry_for(offered.contexts[context]), .synthesized = false};
    // Upstream cannot tell base:allocation (it lacked it when this client
    // came, or lost it in a reconnect since): everything is data, always a
    // safe answer.
    source.synthesized =
        !offered.upstream_context(context) || (context == static_cast<uint32_t>(offered.base_allocation) &&
                                               !info_.upstream_context(static_cast<size_t>(info_.base_allocation)));
    if (!source.synthesized && (!caching() || !contexts_[source.entry].slot)) cached = false;
    out.push_back(source);
  }
  return cached;
}

bool BlockStatusService::try_answer(const BlockStatusClient& client, const wire::RequestHeader& request,
                                    wire::Bytes& chunks) {
  if (!resolve(client, request, sources_)) return false;
  const size_t before = chunks.size();
  const wire::ReplyForm form = reply_form(client, request);
  bool from_cache = false;
  for (size_t k = 0; k < sources_.size(); ++k) {
    const Source& source = sources_[k];
    if (source.synthesized) {
      hit_.assign(1, wire::Descriptor{request.length, 0});
    } else if (lookup(source.entry, request.offset, request.length, request.flags & wire::kCmdFlagReqOne, hit_)) {
      from_cache = true;
    } else {
      chunks.resize(before);  // one context is not cached here: the whole query is a miss
      return false;
    }
    add_chunk(chunks, form, request.cookie, k + 1 == sources_.size(), source.context, hit_);
  }
  if (from_cache) maybe_prefetch(request.offset);
  ++metrics_.block_status_hits;
  for (const Source& source : sources_) ++contexts_[source.entry].counters->hits;
  return true;
}

awaitable<BlockStatusReply> BlockStatusService::answer(BlockStatusClient client, wire::RequestHeader request) {
  ++metrics_.block_status_misses;
  std::vector<Source> sources;
  const bool cached = resolve(client, request, sources);
  for (const Source& source : sources) ++contexts_[source.entry].counters->misses;
  const wire::RequestHeader asked =
      asked_upstream(request, client.align, client.offered->size, info_.max_block_status_length);
  if (!cached) co_return co_await pass_through(client, request, asked, sources);
  const bool req_one = request.flags & wire::kCmdFlagReqOne;
  std::vector<size_t> entries;  // the contexts the cache answers, each once
  for (const Source& source : sources) {
    if (!source.synthesized && std::find(entries.begin(), entries.end(), source.entry) == entries.end()) {
      entries.push_back(source.entry);
    }
  }
  BlockStatusReply reply;
  Answers answers(entries.size());
  if (!entries.empty()) {
    reply.error =
        co_await answer_after_miss(asked.offset, asked.length, asked.flags & wire::kCmdFlagReqOne, entries, answers);
    if (reply.error) co_return reply;
  }
  const bool widened = asked.offset != request.offset || asked.length != request.length;
  const wire::ReplyForm form = reply_form(client, request);
  std::vector<wire::Descriptor> cut;
  for (size_t k = 0; k < sources.size(); ++k) {
    const Source& source = sources[k];
    cut.clear();
    if (source.synthesized) {
      cut.push_back({request.length, 0});
    } else {
      const auto& answered =
          answers[static_cast<size_t>(std::find(entries.begin(), entries.end(), source.entry) - entries.begin())];
      if (widened) {
        wire::cut_descriptors(answered, request.offset - asked.offset, request.length, req_one, cut);
      } else {
        cut = answered;
      }
    }
    add_chunk(reply.chunks, form, request.cookie, k + 1 == sources.size(), source.context, cut);
  }
  co_return reply;
}

// Contexts bscache does not cache: one upstream call answers every context
// the client selected that upstream has (those its filter names, if it sent
// one), each translated to the client's context id; base:allocation where
// upstream lacks it is all data. A query longer than one upstream request
// carries (an extended-headers client's) is answered for what that covers.
awaitable<BlockStatusReply> BlockStatusService::pass_through(const BlockStatusClient& client,
                                                             const wire::RequestHeader& request,
                                                             const wire::RequestHeader& asked,
                                                             const std::vector<Source>& sources) {
  const ExportInfo& offered = *client.offered;
  for (const Source& source : sources) {
    if (!source.synthesized) ++contexts_[source.entry].counters->upstream_calls;
  }
  auto result = co_await upstream_.block_status(asked.offset, upstream_length(asked.length),
                                                {.req_one = (asked.flags & wire::kCmdFlagReqOne) != 0});
  BlockStatusReply reply;
  if (result.error) {
    reply.error = result.error;  // the pool logged and counted it
    co_return reply;
  }
  const wire::ReplyForm form = reply_form(client, request);
  std::vector<wire::Descriptor> descriptors;
  for (size_t k = 0; k < sources.size(); ++k) {
    const uint32_t context = sources[k].context;
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
    add_chunk(reply.chunks, form, request.cookie, k + 1 == sources.size(), context, descriptors);
  }
  co_return reply;
}

awaitable<int> BlockStatusService::answer_after_miss(uint64_t offset, uint64_t length, bool req_one,
                                                     std::vector<size_t> entries, Answers& out) {
  // From now on every fetch stores these contexts too, this one's included
  // (its reply carries every context upstream negotiated).
  for (const size_t entry : entries) contexts_[entry].queried = true;
  auto fetch = joinable_fetch(offset);
  if (!fetch) {
    if (policy::should_bypass(cache_.extents().max_extents())) {
      co_return co_await forward_unchanged(offset, length, req_one, entries, out);
    }
    fetch = start_fetch(
        policy::window_for_miss(offset, length, req_one, planned_window(offset), info_.max_block_status_length), false);
  }
  while (!fetch->finished) co_await fetch->done.wait();
  // The reply answers its waiters even if it was not stored (too old for the
  // TTL, more than the cache can hold, or evicted since), as a pass-through
  // would have: a miss never costs more than one upstream call. The cache may
  // know the offset when the reply does not (a write completed there).
  bool answered = !fetch->error;
  for (size_t k = 0; k < entries.size() && answered; ++k) {
    answered = answer_from(*fetch, entries[k], offset, length, req_one, out[k]) ||
               lookup(entries[k], offset, length, req_one, out[k]);
  }
  if (answered) {
    maybe_prefetch(offset);
    co_return 0;
  }
  // The fetch failed (e.g. upstream refuses long windows) or a write racing
  // it left this offset unknown: ask for exactly this request.
  co_return co_await ask_upstream_directly(offset, length, req_one, entries, out);
}

awaitable<int> BlockStatusService::forward_unchanged(uint64_t offset, uint64_t length, bool req_one,
                                                     const std::vector<size_t>& entries, Answers& out) {
  if (!bypass_logged_) {
    bypass_logged_ = true;
    spdlog::warn(
        "the cache holds at most {} extents, too few to keep a window of {} beside the one being read: "
        "block-status misses are forwarded upstream as they come (see cache.bypassed)",
        cache_.extents().max_extents(), policy::kMinWindowExtents);
  }
  ++metrics_.cache_bypassed;
  co_return co_await ask_upstream_directly(offset, length, req_one, entries, out);
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

bool BlockStatusService::lookup(size_t entry, uint64_t offset, uint64_t length, bool req_one,
                                std::vector<wire::Descriptor>& out) {
  scratch_.clear();
  const auto slot = contexts_[entry].slot;
  if (!slot || cache_.extents(*slot).lookup(offset, length, scratch_, req_one ? 1 : config_.max_descriptors) == 0) {
    return false;
  }
  out.clear();
  for (const auto& e : scratch_) out.push_back({e.length, e.flags});
  return true;
}

bool BlockStatusService::answer_from(const Fetch& fetch, size_t entry, uint64_t offset, uint64_t length, bool req_one,
                                     std::vector<wire::Descriptor>& out) {
  scratch_.clear();
  if (entry >= fetch.usable.size() ||
      cache::lookup_run(fetch.usable[entry], offset, length, scratch_, req_one ? 1 : kMaxReplyDescriptors) == 0) {
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
                                                         const std::vector<size_t>& entries, Answers& out) {
  const uint64_t asked = upstream_length(length);
  for (const size_t entry : entries) ++contexts_[entry].counters->upstream_calls;
  auto result = co_await upstream_.block_status(offset, asked, {.req_one = req_one});
  if (result.error) co_return result.error;  // the pool logged and counted it
  for (size_t k = 0; k < entries.size(); ++k) {
    out[k].clear();
    if (const auto* descriptors = result.extents_for(contexts_[entries[k]].name)) {
      wire::clip_descriptors(*descriptors, asked, req_one, out[k]);
    }
    if (out[k].empty()) co_return EIO;
  }
  co_return 0;
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
  for (const auto& entry : contexts_) {
    if (entry.slot && entry.queried) ++entry.counters->upstream_calls;
  }
  const auto started = std::chrono::steady_clock::now();
  auto result = co_await upstream_.block_status(fetch->offset, fetch->length, {});
  latency_.record(std::chrono::steady_clock::now() - started);
  // Every context clients asked about (by now: some may have joined while it
  // was out) that upstream answered; one reply fills all their windows.
  std::vector<size_t> filled;
  std::vector<std::vector<cache::Extent>> extents;
  uint64_t covered_end = fetch->offset;
  size_t descriptor_count = 0;
  for (size_t e = 0; e < contexts_.size() && !result.error; ++e) {
    ContextEntry& entry = contexts_[e];
    if (!entry.slot || !entry.queried) continue;
    const auto* descriptors = result.extents_for(entry.name);
    if (!descriptors) continue;  // upstream lost it in a reconnect: its waiters ask again, and fail
    if (entry.kind == policy::ContextKind::DirtyBitmap) learn_bitmap_granularity(entry, fetch->offset, *descriptors);
    auto& run = extents.emplace_back();
    run.reserve(descriptors->size());
    uint64_t pos = fetch->offset;
    for (const auto& d : *descriptors) {
      run.push_back({pos, d.length, d.flags});
      pos += d.length;
    }
    covered_end = std::max(covered_end, pos);
    descriptor_count += descriptors->size();
    filled.push_back(e);
  }
  if (!result.error && filled.empty()) result.error = EIO;  // upstream changed its contexts
  if (result.error) {
    cache_.abort_fetch(ticket);  // the pool logged and counted it
    fetch->error = result.error;
  } else {
    const uint64_t end = std::min(info_.size, fetch->offset + fetch->length);
    density_.record(descriptor_count, std::min(covered_end, end) - std::min(fetch->offset, end));
    // The window's extents are shared by the contexts it fills (the capacity rule).
    const size_t per_context = std::max<size_t>(fetch->store_limit / filled.size(), 1);
    std::vector<cache::CoherentCache::ContextReply> replies;
    for (size_t k = 0; k < filled.size(); ++k) {
      replies.push_back({.context = *contexts_[filled[k]].slot, .extents = extents[k], .max_stored = per_context});
    }
    auto outcomes = cache_.complete_fetch(ticket, replies, end);
    fetch->usable.resize(contexts_.size());
    std::optional<uint64_t> stored_end;  // where every context's stored part reaches
    for (size_t k = 0; k < filled.size(); ++k) {
      auto& outcome = outcomes[k];
      if (outcome.stored > 0) {
        const uint64_t reach = outcome.usable[outcome.stored - 1].end();
        stored_end = stored_end ? std::min(*stored_end, reach) : reach;
      }
      fetch->usable[filled[k]] = std::move(outcome.usable);
    }
    if (stored_end) note_window(fetch->offset, *stored_end, fetch->prefetch);
    spdlog::debug("fetched {} extents of {} contexts for {}+{}{}", descriptor_count, filled.size(), fetch->offset,
                  fetch->length, fetch->prefetch ? " (prefetch)" : "");
  }
  fetch->finished = true;
  if (auto it = fetches_.find(fetch->offset); it != fetches_.end() && it->second == fetch) fetches_.erase(it);
  fetch->done.notify();
}

// A write through bscache dirties whole granules of a bitmap: its range is
// forgotten rounded out to the largest granule the replies allow. Where one
// descriptor ends and the next begins, the bitmap changes state: a multiple
// of the granule (the reply's end is only where the request ended).
void BlockStatusService::learn_bitmap_granularity(ContextEntry& entry, uint64_t start,
                                                  const std::vector<wire::Descriptor>& reply) {
  uint64_t pos = start;
  for (size_t i = 0; i + 1 < reply.size(); ++i) {
    pos += reply[i].length;
    entry.bitmap.saw_boundary(pos);
  }
  cache_.set_granularity(*entry.slot, std::max(config_.limits.allocation_granularity, entry.bitmap.bound()));
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
  // base:allocation's state; the contexts that do not remember mutations
  // (policy::remembers_mutations) only forget the range.
  std::optional<uint32_t> state;
  if (succeeded && caching()) state = policy::state_after(policy::ContextKind::BaseAllocation, kind);
  cache_.complete_mutation(ticket, offset, length, state);
  if (state) ++metrics_.ranges_updated;
}

void BlockStatusService::clear() {
  cache_.clear();
  windows_.clear();
  // Upstream may come back with another bitmap under the same name.
  for (auto& entry : contexts_) {
    if (entry.kind != policy::ContextKind::DirtyBitmap) continue;
    entry.bitmap.reset();
    cache_.set_granularity(*entry.slot, std::max(config_.limits.allocation_granularity, entry.bitmap.bound()));
  }
}

CacheGauges BlockStatusService::gauges() const {
  CacheGauges gauges;
  for (size_t slot = 0; slot < cache_.contexts(); ++slot) {
    const auto& e = cache_.extents(slot);
    gauges.extents += e.extent_count();
    gauges.memory_bytes += e.memory_bytes();
    gauges.evictions += e.evictions();
    gauges.expirations += e.expirations();
    gauges.max_extents = e.max_extents();
  }
  return gauges;
}

}  // namespace bscache::proxy
