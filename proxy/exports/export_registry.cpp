#include "proxy/exports/export_registry.hpp"

#include <spdlog/spdlog.h>

#include <algorithm>

#include <boost/asio/post.hpp>

#include "proxy/io/loop_signal.hpp"

namespace bscache::proxy {

namespace {
// How long upstream's LIST answer is reused.
constexpr auto kListingLifetime = std::chrono::seconds(5);

// Every export's cache draws on one budget: --cache-max-extents (or
// --cache-max-memory) bounds the sum over exports, not each one.
ExportSettings with_shared_budget(ExportSettings settings) {
  auto& limits = settings.block_status.limits;
  limits.budget = std::make_shared<cache::CacheBudget>(limits.max_extents);
  return settings;
}

// Whether upstream lists `name` among its exports (false when it does not list).
bool listed(const std::optional<UpstreamListing>& listing, const std::string& name) {
  if (!listing || !listing->listed()) return false;
  const auto& exports = listing->exports;
  return std::any_of(exports.begin(), exports.end(), [&](const ExportListing& e) { return e.name == name; });
}

// Runs `job` (blocking) on `pool`; its result comes back on the awaiting coroutine's executor (the loop).
template <typename Result, typename Job>
awaitable<Result> off_loop(boost::asio::thread_pool& pool, Job job) {
  return asio::async_initiate<decltype(use_awaitable), void(Result)>(
      [&pool, job = std::move(job)](auto handler) mutable {
        asio::post(pool, [job = std::move(job), handler = std::move(handler)]() mutable {
          Result result = job();
          auto executor = asio::get_associated_executor(handler);
          asio::post(executor, [handler = std::move(handler), result = std::move(result)]() mutable {
            handler(std::move(result));
          });
        });
      },
      use_awaitable);
}
}  // namespace

// What the opener thread brings back for one name.
struct ExportRegistry::Opened {
  std::vector<OpenedUpstream> handles;
  std::string canonical;  // the name upstream reports for it
  std::string error;      // set: refused, with upstream's message
  std::optional<UpstreamListing> listing;
  bool listing_known = false;
};

// Every other export whose map a write may change, forgotten while it is in flight.
class ExportRegistry::AliasedWrite {
 public:
  explicit AliasedWrite(const Export& writer) : writer_(&writer) {}
  AliasedWrite(const AliasedWrite&) = delete;
  AliasedWrite& operator=(const AliasedWrite&) = delete;
  ~AliasedWrite() {
    // Whatever the write did, the other exports' state of the disk is unknown.
    for (auto& held : held_) {
      if (!held.target->closed()) {
        held.target->block_status().end_mutation(held.ticket, 0, held.size, policy::Mutation::Write, false);
      }
    }
  }
  // Covers `e` if the write may change what it shows.
  void cover(const std::shared_ptr<Export>& e) {
    if (e.get() == writer_ || e->closed() || !(writer_->may_alias() || e->may_alias())) return;
    const uint64_t size = e->info().size;
    held_.push_back({e, e->block_status().begin_mutation(0, size), size});
  }

 private:
  struct Held {
    std::shared_ptr<Export> target;
    BlockStatusService::Ticket ticket;
    uint64_t size;
  };
  const Export* writer_;
  std::vector<Held> held_;
};

// Clients naming an export that is being opened wait for that one opening.
struct ExportRegistry::PendingOpen {
  explicit PendingOpen(asio::io_context& io) : done(io) {}
  LoopSignal done;  // notified once the opening is over
  bool finished = false;
  uint32_t error = 0;
  std::string message;
};

ExportRegistry::ExportRegistry(asio::io_context& io, UpstreamTarget target, ExportSettings settings,
                               ExportLimits limits)
    : io_(io),
      target_(std::move(target)),
      settings_(with_shared_budget(std::move(settings))),
      limits_(limits),
      idle_sweep_(io) {}

ExportRegistry::~ExportRegistry() {
  opener_.join();
  close_all();
}

UpstreamTarget ExportRegistry::target_for(const std::string& name) const {
  UpstreamTarget target = target_;
  target.export_name = name;
  target.export_name_set = true;
  return target;
}

std::shared_ptr<Metrics> ExportRegistry::metrics_for(const std::string& key) {
  auto& slot = metrics_[key];
  if (!slot) slot = std::make_shared<Metrics>();
  return slot;
}

void ExportRegistry::start() {
  if (limits_.mode == ExportsMode::Single) {
    auto handles = UpstreamPool::connect(target_, settings_.upstream);
    const std::string name = handles.front().info.export_name;
    single_ = std::make_shared<Export>(io_, name, std::move(handles), target_, settings_, metrics_for(name));
    single_->on_state_change([this] {
      if (on_state_) on_state_();
    });
    open_[name] = single_;  // never idle-closed: no sweep, no make_room in this mode
    return;
  }
  // Passthrough: nothing is opened before a client names it, but a server
  // that does not answer at all should fail the start, visibly.
  listing_ = list_upstream_exports(target_);
  listing_at_ = std::chrono::steady_clock::now();
  if (listing_->listed()) {
    std::string names;
    for (const auto& e : listing_->exports) names += (names.empty() ? "\"" : ", \"") + e.name + "\"";
    spdlog::info("upstream lists {} export{}: {}", listing_->exports.size(), listing_->exports.size() == 1 ? "" : "s",
                 names);
  } else {
    spdlog::warn(
        "upstream does not list its exports (NBD_REP_ERR {:#x}: {}): clients asking for the list get that answer, "
        "and every name a client gives may be another name for one disk",
        listing_->error, listing_->message);
  }
}

ExportLookup ExportRegistry::hold(const std::shared_ptr<Export>& e) const {
  ExportLookup lookup;
  lookup.hold = std::make_unique<Export::Hold>(e);
  return lookup;
}

awaitable<ExportLookup> ExportRegistry::find(std::string name) {
  if (limits_.mode == ExportsMode::Single) co_return hold(single_);
  for (;;) {
    auto alias = aliases_.find(name);
    const std::string& key = alias == aliases_.end() ? name : alias->second;
    if (auto it = open_.find(key); it != open_.end()) co_return hold(it->second);
    auto pending = opening_.find(name);
    if (pending == opening_.end()) {
      co_return co_await open(name);
    }
    // Someone else is opening it: wait for that, then look again.
    auto wait = pending->second;
    while (!wait->finished) co_await wait->done.wait();
    if (wait->error) co_return ExportLookup{nullptr, wait->error, wait->message};
  }
}

awaitable<ExportLookup> ExportRegistry::open(const std::string& name) {
  auto pending = std::make_shared<PendingOpen>(io_);
  opening_[name] = pending;
  auto finish = [&](uint32_t error, std::string message) {
    pending->finished = true;
    pending->error = error;
    pending->message = std::move(message);
    pending->done.notify();
    opening_.erase(name);
  };
  if (!make_room()) {
    const std::string message = "bscache already serves " + std::to_string(open_.size()) +
                                " exports, all in use (--max-exports " + std::to_string(limits_.max_exports) + ")";
    spdlog::warn("export \"{}\" refused: {}", name, message);
    finish(wire::kRepErrPolicy, message);
    co_return ExportLookup{nullptr, wire::kRepErrPolicy, message};
  }

  const bool refresh = std::chrono::steady_clock::now() - listing_at_ > kListingLifetime;
  auto cached = listing_;
  // A named lambda, not a temporary in the co_await: GCC 12 destroys a
  // temporary with non-trivial captures in a co_await expression twice.
  auto job = [this, name, refresh, cached]() {
    Opened out;
    try {
      out.listing = refresh ? list_upstream_exports(target_) : cached;
      out.listing_known = true;
      out.handles = UpstreamPool::connect(target_for(name), settings_.upstream);
      out.canonical = out.handles.front().info.export_name;
    } catch (const std::exception& e) {
      out.error = e.what();
      out.handles.clear();
    }
    return out;
  };
  Opened opened = co_await off_loop<Opened>(opener_, std::move(job));
  if (opened.listing_known && refresh) {
    listing_ = opened.listing;
    listing_at_ = std::chrono::steady_clock::now();
  }
  if (!opened.error.empty()) {
    spdlog::warn("export \"{}\" refused: {}", name, opened.error);
    finish(wire::kRepErrUnknown, opened.error);
    co_return ExportLookup{nullptr, wire::kRepErrUnknown, opened.error};
  }
  const std::string key = opened.canonical;
  std::shared_ptr<Export> e;
  if (auto it = open_.find(key); it != open_.end()) {
    e = it->second;  // another name of an export already open: share it (the new connections close)
  } else if (!make_room()) {
    const std::string message = "too many exports in use (--max-exports " + std::to_string(limits_.max_exports) + ")";
    finish(wire::kRepErrPolicy, message);
    co_return ExportLookup{nullptr, wire::kRepErrPolicy, message};
  } else {
    try {
      e = std::make_shared<Export>(io_, key, std::move(opened.handles), target_for(key), settings_, metrics_for(key),
                                   !listed(opened.listing, key));
    } catch (const std::exception& ex) {
      spdlog::warn("export \"{}\" refused: {}", name, ex.what());
      finish(wire::kRepErrPolicy, ex.what());
      co_return ExportLookup{nullptr, wire::kRepErrPolicy, ex.what()};
    }
    e->on_state_change([this] {
      if (on_state_) on_state_();
    });
    open_[key] = e;
    // Writes in flight through other exports may already have changed what it shows.
    std::erase_if(aliased_writes_, [](const auto& w) { return w.expired(); });
    for (const auto& write : aliased_writes_) write.lock()->cover(e);
    spdlog::info(
        "export \"{}\" opened ({} bytes, {} upstream connection{}, {} of them bscache's own for data; {} open{})", key,
        e->info().size, e->upstream().connections(), e->upstream().connections() == 1 ? "" : "s",
        e->upstream().wire_connections(), open_.size(),
        e->may_alias() ? "; upstream does not list it, so it may be another name for a listed disk: a write through "
                         "it makes every other export forget its map"
                       : "");
    arm_idle_sweep();
  }
  if (name != key) aliases_[name] = key;
  ExportLookup lookup = hold(e);
  finish(0, {});
  co_return lookup;
}

// Below --max-exports, closing the least recently used idle export if need be.
bool ExportRegistry::make_room() {
  while (open_.size() >= limits_.max_exports) {
    auto oldest = open_.end();
    for (auto it = open_.begin(); it != open_.end(); ++it) {
      if (it->second->idle() && (oldest == open_.end() || it->second->last_used() < oldest->second->last_used())) {
        oldest = it;
      }
    }
    if (oldest == open_.end()) return false;
    spdlog::info("export \"{}\" closed: least recently used, to make room (--max-exports {})", oldest->first,
                 limits_.max_exports);
    close(oldest->first);
  }
  return true;
}

awaitable<UpstreamListing> ExportRegistry::list() {
  if (limits_.mode == ExportsMode::Single) {
    co_return UpstreamListing{{{single_->info().name, single_->info().description}}, 0, {}};
  }
  // An error is asked again: it may have been passing, and the client should see what upstream says now.
  if (!listing_ || !listing_->listed() || std::chrono::steady_clock::now() - listing_at_ > kListingLifetime) {
    using Fresh = std::optional<UpstreamListing>;
    auto job = [this]() -> Fresh {
      try {
        return list_upstream_exports(target_);
      } catch (const std::exception& e) {
        spdlog::warn("listing upstream's exports: {}", e.what());
        return std::nullopt;  // unreachable now
      }
    };
    Fresh fresh = co_await off_loop<Fresh>(opener_, std::move(job));
    if (fresh) {
      listing_ = std::move(*fresh);
      listing_at_ = std::chrono::steady_clock::now();
    } else if (!listing_ || !listing_->listed()) {
      co_return UpstreamListing{{}, wire::kRepErrShutdown, "upstream cannot be reached to list its exports"};
    }
  }
  co_return *listing_;  // unreachable now but listed recently: what it said then
}

std::shared_ptr<ExportRegistry::AliasedWrite> ExportRegistry::begin_aliased_write(const Export& writer) {
  if (limits_.mode == ExportsMode::Single) return nullptr;
  auto write = std::make_shared<AliasedWrite>(writer);
  for (const auto& [key, e] : open_) write->cover(e);
  std::erase_if(aliased_writes_, [](const auto& w) { return w.expired(); });
  aliased_writes_.push_back(write);
  return write;
}

void ExportRegistry::arm_idle_sweep() {
  if (sweep_armed_ || open_.empty()) return;
  sweep_armed_ = true;
  const auto period = std::clamp<std::chrono::milliseconds>(limits_.idle_timeout / 4, std::chrono::milliseconds(50),
                                                            std::chrono::milliseconds(1000));
  idle_sweep_.expires_after(period);
  idle_sweep_.async_wait([this](boost::system::error_code ec) {
    sweep_armed_ = false;
    if (ec) return;
    sweep_idle();
    arm_idle_sweep();
  });
}

void ExportRegistry::sweep_idle() {
  const auto now = std::chrono::steady_clock::now();
  std::vector<std::string> expired;
  for (const auto& [key, e] : open_) {
    if (e->idle() && now - e->last_used() >= limits_.idle_timeout) expired.push_back(key);
  }
  for (const auto& key : expired) {
    spdlog::info("export \"{}\" closed: no client for {} ms (--export-idle-timeout)", key,
                 limits_.idle_timeout.count());
    close(key);
  }
}

void ExportRegistry::close(const std::string& key) {
  auto it = open_.find(key);
  if (it == open_.end()) return;
  it->second->close();
  const CacheGauges last = it->second->cache_gauges();
  retired_cache_.evictions += last.evictions;
  retired_cache_.expirations += last.expirations;
  open_.erase(it);
  std::erase_if(aliases_, [&](const auto& alias) { return alias.second == key; });
  if (on_state_) on_state_();
}

std::vector<ExportStats> ExportRegistry::stats() const {
  std::vector<ExportStats> out;
  for (const auto& [key, metrics] : metrics_) {
    ExportStats s{key, metrics.get(), {}, false};
    if (auto it = open_.find(key); it != open_.end()) {
      s.open = !it->second->closed();
      s.cache = it->second->cache_gauges();
    }
    out.push_back(s);
  }
  return out;
}

Metrics ExportRegistry::totals() const {
  Metrics sum;
  for (const auto& [key, metrics] : metrics_) add_export_counters(sum, *metrics);
  return sum;
}

CacheGauges ExportRegistry::cache_totals() const {
  CacheGauges sum = retired_cache_;
  // The limit in force for each export's cache, open or not yet.
  sum.max_extents = settings_.block_status.limits.max_extents;
  auto add = [&](const Export& e) {
    const CacheGauges g = e.cache_gauges();
    sum.extents += g.extents;
    sum.memory_bytes += g.memory_bytes;
    sum.evictions += g.evictions;
    sum.expirations += g.expirations;
  };
  for (const auto& [key, e] : open_) add(*e);
  return sum;
}

template <typename F>
void ExportRegistry::for_each_serving(F f) const {
  for (const auto& [key, e] : open_) {
    if (!e->closed()) f(*e);
  }
}

size_t ExportRegistry::in_flight() const {
  size_t n = 0;
  for_each_serving([&](Export& e) { n += e.upstream().in_flight(); });
  return n;
}

size_t ExportRegistry::connections() const {
  size_t n = 0;
  for_each_serving([&](Export& e) { n += e.upstream().connections(); });
  return n;
}

bool ExportRegistry::any_export_down() const {
  bool down = false;
  for_each_serving([&](Export& e) { down = down || e.upstream().connections_up() == 0; });
  return down;
}

void ExportRegistry::shutdown() {
  for_each_serving([](Export& e) { e.upstream().shutdown(); });
}

void ExportRegistry::close_all() {
  for (const auto& [key, e] : open_) e->close();  // kept: their final gauges go into the last stats
}

}  // namespace bscache::proxy
