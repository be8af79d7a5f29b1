#include "proxy/metrics.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
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
}  // namespace

std::string render_stats_json(const Metrics& m, const CacheGauges& cache, const std::string& policy) {
  nlohmann::json doc;
  doc["uptime_seconds"] = uptime(m);
  doc["policy"] = policy;
  doc["client"] = {{"connections_current", m.connections_current},
                   {"connections_total", m.connections_total},
                   {"connections_rejected", m.connections_rejected},
                   {"requests", by_op(m.client_requests)},
                   {"errors", by_op(m.client_errors)}};
  doc["block_status"] = {{"hits", m.block_status_hits},
                         {"misses", m.block_status_misses},
                         {"hit_rate", hit_rate(m)},
                         {"upstream_calls_saved", upstream_calls_saved(m)}};
  const auto& h = m.upstream_block_status_latency;
  doc["upstream"] = {{"requests", by_op(m.upstream_requests)},
                     {"errors", by_op(m.upstream_errors)},
                     {"reconnects", m.upstream_reconnects},
                     {"connections", m.upstream_connections},
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
  return doc.dump(2) + "\n";
}

namespace {
void family(std::ostringstream& out, const char* name, const char* type, const char* help) {
  out << "# HELP " << name << ' ' << help << "\n# TYPE " << name << ' ' << type << '\n';
}
void per_op(std::ostringstream& out, const char* name, const std::array<uint64_t, kOpCount>& counts) {
  for (uint16_t op = 0; op < kOpCount; ++op) {
    if (op != wire::kCmdDisc) out << name << "{op=\"" << wire::command_name(op) << "\"} " << counts[op] << '\n';
  }
}
void sample(std::ostringstream& out, const char* name, const char* type, const char* help, double value) {
  family(out, name, type, help);
  out << name << ' ' << value << '\n';
}
}  // namespace

std::string render_prometheus(const Metrics& m, const CacheGauges& cache, const std::string& policy) {
  std::ostringstream out;
  out.precision(17);
  family(out, "bscache_info", "gauge", "Static information about this bscache.");
  out << "bscache_info{policy=\"" << policy << "\"} 1\n";
  sample(out, "bscache_uptime_seconds", "gauge", "Seconds since bscache started.", uptime(m));
  sample(out, "bscache_client_connections", "gauge", "Client connections open now.",
         static_cast<double>(m.connections_current));
  sample(out, "bscache_client_connections_total", "counter", "Client connections accepted.",
         static_cast<double>(m.connections_total));
  sample(out, "bscache_client_connections_rejected_total", "counter", "Client connections refused at the limit.",
         static_cast<double>(m.connections_rejected));
  family(out, "bscache_client_requests_total", "counter", "Client requests received, by operation.");
  per_op(out, "bscache_client_requests_total", m.client_requests);
  family(out, "bscache_client_errors_total", "counter", "Client requests answered with an error, by operation.");
  per_op(out, "bscache_client_errors_total", m.client_errors);
  sample(out, "bscache_block_status_hits_total", "counter",
         "Block-status requests answered without waiting on upstream.", static_cast<double>(m.block_status_hits));
  sample(out, "bscache_block_status_misses_total", "counter", "Block-status requests that waited on upstream.",
         static_cast<double>(m.block_status_misses));
  sample(out, "bscache_block_status_hit_ratio", "gauge", "hits / (hits + misses), 0 before any request.", hit_rate(m));
  // A gauge: it falls when the cache costs more calls than it saves. The name
  // keeps its _total suffix so existing dashboards keep working.
  sample(out, "bscache_upstream_calls_saved_total", "gauge",
         "Client block-status requests minus upstream block-status requests (negative: the cache cost calls).",
         static_cast<double>(upstream_calls_saved(m)));
  family(out, "bscache_upstream_requests_total", "counter", "Requests sent upstream, by operation.");
  per_op(out, "bscache_upstream_requests_total", m.upstream_requests);
  family(out, "bscache_upstream_errors_total", "counter", "Upstream requests that failed, by operation.");
  per_op(out, "bscache_upstream_errors_total", m.upstream_errors);
  sample(out, "bscache_upstream_reconnects_total", "counter", "Times the upstream connection was re-established.",
         static_cast<double>(m.upstream_reconnects));
  sample(out, "bscache_upstream_connections", "gauge", "Upstream connections up now.",
         static_cast<double>(m.upstream_connections));
  const auto& h = m.upstream_block_status_latency;
  family(out, "bscache_upstream_request_duration_seconds", "histogram", "Upstream block-status latency.");
  uint64_t cumulative = 0;
  for (size_t i = 0; i < kLatencyBuckets.size(); ++i) {
    cumulative += h.buckets[i];
    out << "bscache_upstream_request_duration_seconds_bucket{op=\"block_status\",le=\"" << kLatencyBuckets[i] << "\"} "
        << cumulative << '\n';
  }
  out << "bscache_upstream_request_duration_seconds_bucket{op=\"block_status\",le=\"+Inf\"} " << h.count << '\n';
  out << "bscache_upstream_request_duration_seconds_sum{op=\"block_status\"} " << h.sum << '\n';
  out << "bscache_upstream_request_duration_seconds_count{op=\"block_status\"} " << h.count << '\n';
  sample(out, "bscache_cache_extents", "gauge", "Extents held in the cache.", static_cast<double>(cache.extents));
  sample(out, "bscache_cache_memory_bytes", "gauge", "Estimated heap bytes held by the cache.",
         static_cast<double>(cache.memory_bytes));
  sample(out, "bscache_cache_max_extents", "gauge", "Most extents the cache holds (--cache-max-extents/-memory).",
         static_cast<double>(cache.max_extents));
  sample(out, "bscache_cache_evictions_total", "counter",
         "Stored windows evicted (or cut short) to stay under the limit.", static_cast<double>(cache.evictions));
  sample(out, "bscache_cache_bypassed_total", "counter",
         "Block-status misses forwarded unchanged because the cache could not keep a window.",
         static_cast<double>(m.cache_bypassed));
  sample(out, "bscache_cache_expirations_total", "counter", "Stored windows dropped by --policy ttl.",
         static_cast<double>(cache.expirations));
  sample(out, "bscache_prefetches_total", "counter", "Windows fetched ahead of a scan.",
         static_cast<double>(m.prefetches_issued));
  sample(out, "bscache_prefetches_used_total", "counter", "Prefetched windows that later answered a client.",
         static_cast<double>(m.prefetches_used));
  sample(out, "bscache_cache_ranges_invalidated_total", "counter", "Ranges dropped because a mutation began.",
         static_cast<double>(m.ranges_invalidated));
  sample(out, "bscache_cache_ranges_updated_total", "counter", "Ranges set from a completed mutation.",
         static_cast<double>(m.ranges_updated));
  return out.str();
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
