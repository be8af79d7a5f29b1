#include "proxy/ops/metrics.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <sstream>

#include <nlohmann/json.hpp>

#include "proxy/wire/codec.hpp"

namespace bscache::proxy {

void Histogram::observe(double seconds) {
  ++count;
  sum += seconds;
  for (size_t i = 0; i < kLatencyBuckets.size(); ++i) {
    if (seconds <= kLatencyBuckets[i]) {
      ++buckets[i];
      return;
    }
  }
}

void add_export_counters(Metrics& total, const Metrics& part) {
  for (size_t op = 0; op < kOpCount; ++op) {
    total.client_requests[op] += part.client_requests[op];
    total.client_errors[op] += part.client_errors[op];
    total.upstream_requests[op] += part.upstream_requests[op];
    total.upstream_errors[op] += part.upstream_errors[op];
  }
  total.block_status_hits += part.block_status_hits;
  total.block_status_misses += part.block_status_misses;
  auto& h = total.upstream_block_status_latency;
  const auto& p = part.upstream_block_status_latency;
  for (size_t i = 0; i < h.buckets.size(); ++i) h.buckets[i] += p.buckets[i];
  h.count += p.count;
  h.sum += p.sum;
  total.prefetches_issued += part.prefetches_issued;
  total.prefetches_used += part.prefetches_used;
  total.ranges_invalidated += part.ranges_invalidated;
  total.ranges_updated += part.ranges_updated;
  total.upstream_reconnects += part.upstream_reconnects;
  total.upstream_connections += part.upstream_connections;
  total.upstream_extended_headers += part.upstream_extended_headers;
  total.reads_spliced += part.reads_spliced;
  total.writes_spliced += part.writes_spliced;
  total.cache_bypassed += part.cache_bypassed;
  for (const auto& [name, c] : part.contexts) {
    auto& sum = total.contexts[name];
    sum.hits += c.hits;
    sum.misses += c.misses;
    sum.upstream_calls += c.upstream_calls;
  }
}

double ContextCounters::hit_rate() const {
  const uint64_t total = hits + misses;
  return total ? static_cast<double>(hits) / static_cast<double>(total) : 0.0;
}

double hit_rate(const Metrics& m) {
  const uint64_t total = m.block_status_hits + m.block_status_misses;
  return total ? static_cast<double>(m.block_status_hits) / static_cast<double>(total) : 0.0;
}

namespace {
nlohmann::json by_op(const std::array<uint64_t, kOpCount>& counts) {
  nlohmann::json out = nlohmann::json::object();
  for (uint16_t op = 0; op < kOpCount; ++op) {
    if (op != wire::kCmdDisc) out[wire::command_name(op)] = counts[op];
  }
  return out;
}

double uptime(const Metrics& m) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - m.started).count();
}

// The sections counted per export (and, summed, for all of them).
void export_sections(nlohmann::json& doc, const Metrics& m, const CacheGauges& cache) {
  doc["client"]["requests"] = by_op(m.client_requests);
  doc["client"]["errors"] = by_op(m.client_errors);
  doc["block_status"] = {{"hits", m.block_status_hits},
                         {"misses", m.block_status_misses},
                         {"hit_rate", hit_rate(m)},
                         {"upstream_calls_saved", upstream_calls_saved(m)},
                         {"contexts", nlohmann::json::object()}};
  for (const auto& [name, c] : m.contexts) {
    doc["block_status"]["contexts"][name] = {
        {"hits", c.hits}, {"misses", c.misses}, {"hit_rate", c.hit_rate()}, {"upstream_calls", c.upstream_calls}};
  }
  const auto& h = m.upstream_block_status_latency;
  doc["upstream"] = {{"requests", by_op(m.upstream_requests)},
                     {"errors", by_op(m.upstream_errors)},
                     {"reconnects", m.upstream_reconnects},
                     {"connections", m.upstream_connections},
                     {"extended_headers", m.upstream_extended_headers},
                     {"reads_spliced", m.reads_spliced},
                     {"writes_spliced", m.writes_spliced},
                     {"block_status_latency_seconds",
                      {{"count", h.count}, {"mean", h.count ? h.sum / static_cast<double>(h.count) : 0.0}}}};
  doc["cache"] = {{"extents", cache.extents},
                  {"max_extents", cache.max_extents},
                  {"memory_bytes", cache.memory_bytes},
                  {"evictions", cache.evictions},
                  {"expirations", cache.expirations},
                  {"bypassed", m.cache_bypassed},
                  {"prefetches", m.prefetches_issued},
                  {"prefetches_used", m.prefetches_used},
                  {"ranges_invalidated", m.ranges_invalidated},
                  {"ranges_updated", m.ranges_updated}};
}
}  // namespace

std::string render_stats_json(const Metrics& m, const CacheGauges& cache, const std::string& policy,
                              const std::vector<ExportStats>& exports) {
  nlohmann::json doc;
  doc["uptime_seconds"] = uptime(m);
  doc["policy"] = policy;
  doc["client"] = {{"connections_current", m.connections_current},   {"connections_total", m.connections_total},
                   {"connections_rejected", m.connections_rejected}, {"memory_bytes", m.client_memory_bytes},
                   {"memory_limit_bytes", m.client_memory_limit},    {"memory_pauses", m.client_memory_pauses},
                   {"memory_paused", m.client_memory_paused}};
  doc["process"] = {{"memory_trims", m.memory_trims}};
  export_sections(doc, m, cache);
  doc["exports"] = nlohmann::json::object();
  for (const auto& e : exports) {
    nlohmann::json one;
    one["open"] = e.open;
    export_sections(one, *e.metrics, e.cache);
    doc["exports"][e.name] = std::move(one);
  }
  return doc.dump(2) + "\n";
}

namespace {
// Label values escape backslash, double quote and newline (the text format's rule).
std::string label_value(const std::string& v) {
  std::string out;
  for (char c : v) {
    if (c == '\\' || c == '"') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out;
}

// One source of per-export series: the total (no label) or one export.
struct Source {
  std::string label;  // `export="name"` or empty
  const Metrics* m;
  CacheGauges cache;
};

class Exposition {
 public:
  explicit Exposition(std::vector<Source> sources) : sources_(std::move(sources)) { out_.precision(17); }
  std::string str() const { return out_.str(); }

  void family(const char* name, const char* type, const char* help) {
    out_ << "# HELP " << name << ' ' << help << "\n# TYPE " << name << ' ' << type << '\n';
  }
  // A series that is not per export.
  void global(const char* name, const char* type, const char* help, double value) {
    family(name, type, help);
    out_ << name << ' ' << value << '\n';
  }
  // A per-export series: the total, then each export.
  template <typename Value>
  void each(const char* name, const char* type, const char* help, Value value) {
    family(name, type, help);
    for (const auto& s : sources_) {
      out_ << name << (s.label.empty() ? "" : "{" + s.label + "}") << ' ' << static_cast<double>(value(s)) << '\n';
    }
  }
  // A per-export counter by operation: `counts` names the array in Metrics.
  void each_op(const char* name, const char* help, std::array<uint64_t, kOpCount> Metrics::*counts) {
    family(name, "counter", help);
    for (const auto& s : sources_) {
      const auto& c = (*s.m).*counts;
      for (uint16_t op = 0; op < kOpCount; ++op) {
        if (op == wire::kCmdDisc) continue;
        out_ << name << '{' << s.label << (s.label.empty() ? "" : ",") << "op=\"" << wire::command_name(op) << "\"} "
             << c[op] << '\n';
      }
    }
  }
  void latency_histogram() {
    const char* name = "bscache_upstream_request_duration_seconds";
    family(name, "histogram", "Upstream block-status latency.");
    for (const auto& s : sources_) {
      const auto& h = s.m->upstream_block_status_latency;
      const std::string labels = s.label + (s.label.empty() ? "" : ",") + "op=\"block_status\"";
      uint64_t cumulative = 0;
      for (size_t i = 0; i < kLatencyBuckets.size(); ++i) {
        cumulative += h.buckets[i];
        out_ << name << "_bucket{" << labels << ",le=\"" << kLatencyBuckets[i] << "\"} " << cumulative << '\n';
      }
      out_ << name << "_bucket{" << labels << ",le=\"+Inf\"} " << h.count << '\n';
      out_ << name << "_sum{" << labels << "} " << h.sum << '\n';
      out_ << name << "_count{" << labels << "} " << h.count << '\n';
    }
  }
  // A per-export series per meta context (label `context`).
  template <typename Value>
  void each_context(const char* name, const char* type, const char* help, Value value) {
    family(name, type, help);
    for (const auto& s : sources_) {
      for (const auto& [context, c] : s.m->contexts) {
        out_ << name << '{' << s.label << (s.label.empty() ? "" : ",") << "context=\"" << label_value(context) << "\"} "
             << static_cast<double>(value(c)) << '\n';
      }
    }
  }
  std::ostringstream& raw() { return out_; }

 private:
  std::vector<Source> sources_;
  std::ostringstream out_;
};
}  // namespace

std::string render_prometheus(const Metrics& m, const CacheGauges& cache, const std::string& policy,
                              const std::vector<ExportStats>& exports) {
  std::vector<Source> sources{{"", &m, cache}};
  for (const auto& e : exports) sources.push_back({"export=\"" + label_value(e.name) + "\"", e.metrics, e.cache});
  Exposition x(std::move(sources));
  x.family("bscache_info", "gauge", "Static information about this bscache.");
  x.raw() << "bscache_info{policy=\"" << policy << "\"} 1\n";
  x.global("bscache_uptime_seconds", "gauge", "Seconds since bscache started.", uptime(m));
  x.global("bscache_client_connections", "gauge", "Client connections open now.",
           static_cast<double>(m.connections_current));
  x.global("bscache_client_connections_total", "counter", "Client connections accepted.",
           static_cast<double>(m.connections_total));
  x.global("bscache_client_connections_rejected_total", "counter", "Client connections refused at the limit.",
           static_cast<double>(m.connections_rejected));
  x.global("bscache_client_memory_bytes", "gauge",
           "Bytes all clients hold in bscache (requests in flight, queued replies).",
           static_cast<double>(m.client_memory_bytes));
  x.global("bscache_client_memory_limit_bytes", "gauge", "The bound on what all clients hold (--max-client-memory).",
           static_cast<double>(m.client_memory_limit));
  x.global("bscache_client_memory_pauses_total", "counter", "Times a client was not read from because of that bound.",
           static_cast<double>(m.client_memory_pauses));
  x.global("bscache_client_memory_paused", "gauge", "Clients not read from now because of that bound.",
           static_cast<double>(m.client_memory_paused));
  x.global("bscache_memory_trims_total", "counter", "Times freed memory was given back to the system (malloc_trim).",
           static_cast<double>(m.memory_trims));
  x.global("bscache_exports_open", "gauge", "Upstream exports open now.",
           static_cast<double>(std::count_if(exports.begin(), exports.end(), [](const auto& e) { return e.open; })));
  x.each_op("bscache_client_requests_total", "Client requests received, by operation.", &Metrics::client_requests);
  x.each_op("bscache_client_errors_total", "Client requests answered with an error, by operation.",
            &Metrics::client_errors);
  x.each("bscache_block_status_hits_total", "counter", "Block-status requests answered without waiting on upstream.",
         [](const Source& s) { return s.m->block_status_hits; });
  x.each("bscache_block_status_misses_total", "counter", "Block-status requests that waited on upstream.",
         [](const Source& s) { return s.m->block_status_misses; });
  x.each("bscache_block_status_hit_ratio", "gauge", "hits / (hits + misses), 0 before any request.",
         [](const Source& s) { return hit_rate(*s.m); });
  // A gauge: it falls when the cache costs more calls than it saves. The name
  // keeps its _total suffix so existing dashboards keep working.
  x.each("bscache_upstream_calls_saved_total", "gauge",
         "Client block-status requests minus upstream block-status requests (negative: the cache cost calls).",
         [](const Source& s) { return upstream_calls_saved(*s.m); });
  x.each_context("bscache_block_status_context_hits_total", "counter",
                 "Block-status requests about a meta context answered without waiting on upstream.",
                 [](const ContextCounters& c) { return c.hits; });
  x.each_context("bscache_block_status_context_misses_total", "counter",
                 "Block-status requests about a meta context that waited on upstream.",
                 [](const ContextCounters& c) { return c.misses; });
  x.each_context("bscache_block_status_context_hit_ratio", "gauge",
                 "hits / (hits + misses) for a meta context, 0 before any request.",
                 [](const ContextCounters& c) { return c.hit_rate(); });
  x.each_context("bscache_block_status_context_upstream_calls_total", "counter",
                 "Upstream block-status calls made for a meta context (a call for several counts for each).",
                 [](const ContextCounters& c) { return c.upstream_calls; });
  x.each_op("bscache_upstream_requests_total", "Requests sent upstream, by operation.", &Metrics::upstream_requests);
  x.each_op("bscache_upstream_errors_total", "Upstream requests that failed, by operation.", &Metrics::upstream_errors);
  x.each("bscache_upstream_reconnects_total", "counter", "Times an upstream connection was re-established.",
         [](const Source& s) { return s.m->upstream_reconnects; });
  x.each("bscache_upstream_connections", "gauge", "Upstream connections up now.",
         [](const Source& s) { return s.m->upstream_connections; });
  x.each("bscache_upstream_extended_headers", "gauge",
         "Upstream connections up now whose requests and replies use extended headers (64-bit lengths).",
         [](const Source& s) { return s.m->upstream_extended_headers; });
  x.each("bscache_upstream_reads_spliced_total", "counter",
         "READs whose data was spliced from upstream to the client through a pipe, never copied.",
         [](const Source& s) { return s.m->reads_spliced; });
  x.each("bscache_upstream_writes_spliced_total", "counter",
         "WRITEs whose data was spliced from the client to upstream through pipes, never copied.",
         [](const Source& s) { return s.m->writes_spliced; });
  x.latency_histogram();
  x.each("bscache_cache_extents", "gauge", "Extents held in the cache.",
         [](const Source& s) { return s.cache.extents; });
  x.each("bscache_cache_memory_bytes", "gauge", "Estimated heap bytes held by the cache.",
         [](const Source& s) { return s.cache.memory_bytes; });
  x.each("bscache_cache_max_extents", "gauge", "Most extents the cache holds (--cache-max-extents/-memory).",
         [](const Source& s) { return s.cache.max_extents; });
  x.each("bscache_cache_evictions_total", "counter", "Stored windows evicted (or cut short) to stay under the limit.",
         [](const Source& s) { return s.cache.evictions; });
  x.each("bscache_cache_bypassed_total", "counter",
         "Block-status misses forwarded unchanged because the cache could not keep a window.",
         [](const Source& s) { return s.m->cache_bypassed; });
  x.each("bscache_cache_expirations_total", "counter", "Stored windows dropped by --policy ttl.",
         [](const Source& s) { return s.cache.expirations; });
  x.each("bscache_prefetches_total", "counter", "Windows fetched ahead of a scan.",
         [](const Source& s) { return s.m->prefetches_issued; });
  x.each("bscache_prefetches_used_total", "counter", "Prefetched windows that later answered a client.",
         [](const Source& s) { return s.m->prefetches_used; });
  x.each("bscache_cache_ranges_invalidated_total", "counter", "Ranges dropped because a mutation began.",
         [](const Source& s) { return s.m->ranges_invalidated; });
  x.each("bscache_cache_ranges_updated_total", "counter", "Ranges set from a completed mutation.",
         [](const Source& s) { return s.m->ranges_updated; });
  return x.str();
}

bool write_file_atomically(const std::string& path, const std::string& contents, std::string& error) {
  const std::string temp = path + ".tmp." + std::to_string(getpid());
  int fd = open(temp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd == -1) {
    error = temp + ": " + strerror(errno);
    return false;
  }
  size_t done = 0;
  while (done < contents.size()) {
    ssize_t n = write(fd, contents.data() + done, contents.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      error = temp + ": " + strerror(errno);
      close(fd);
      unlink(temp.c_str());
      return false;
    }
    done += static_cast<size_t>(n);
  }
  if (close(fd) == -1 || rename(temp.c_str(), path.c_str()) == -1) {
    error = path + ": " + strerror(errno);
    unlink(temp.c_str());
    return false;
  }
  return true;
}

}  // namespace bscache::proxy
