#include "proxy/ops/logging.hpp"

#include <spdlog/formatter.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <memory>

#include <nlohmann/json.hpp>

namespace bscache::proxy {

namespace {

// syslog(3) priorities, which journald reads from a "<N>" at the start of
// each line of a service's stderr (SyslogLevelPrefix=, on by default).
//
// Why not spdlog's systemd_sink: it needs libsystemd (a library and a package
// dependency) for what the prefix already gives, priorities per line; and the
// stream keeps the journal's _PID and SYSLOG_IDENTIFIER from the unit.
int syslog_priority(spdlog::level::level_enum level) {
  switch (level) {
    case spdlog::level::critical: return 2;
    case spdlog::level::err: return 3;
    case spdlog::level::warn: return 4;
    case spdlog::level::info: return 6;
    default: return 7;  // debug, trace
  }
}

std::string iso8601_utc(spdlog::log_clock::time_point time) {
  const auto since_epoch = time.time_since_epoch();
  const auto seconds = std::chrono::duration_cast<std::chrono::seconds>(since_epoch);
  const auto millis = std::chrono::duration_cast<std::chrono::milliseconds>(since_epoch - seconds).count();
  const std::time_t t = seconds.count();
  std::tm utc{};
  gmtime_r(&t, &utc);
  char text[32];
  const size_t n = std::strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%S", &utc);
  return std::string(text, n) + fmt::format(".{:03}Z", millis);
}

// One line per message: text ("LEVEL message", the journal adds the time) or
// a JSON object; with `journal`, every line (a message may hold several)
// starts with its priority.
class LineFormatter final : public spdlog::formatter {
 public:
  LineFormatter(bool json, bool journal) : json_(json), journal_(journal) {}

  void format(const spdlog::details::log_msg& msg, spdlog::memory_buf_t& dest) override {
    const std::string_view message(msg.payload.data(), msg.payload.size());
    const std::string_view level(spdlog::level::to_string_view(msg.level).data(),
                                 spdlog::level::to_string_view(msg.level).size());
    std::string line;
    if (json_) {
      // Invalid UTF-8 (a path, an upstream's message) is replaced, not thrown on.
      const nlohmann::ordered_json object = {
          {"time", iso8601_utc(msg.time)}, {"level", level}, {"message", std::string(message)}};
      line = object.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
    } else {
      line = fmt::format("{} {}", level, message);
    }
    const std::string prefix = journal_ ? fmt::format("<{}>", syslog_priority(msg.level)) : std::string();
    dest.append(prefix.data(), prefix.data() + prefix.size());
    for (char c : line) {
      dest.push_back(c);
      if (c == '\n') dest.append(prefix.data(), prefix.data() + prefix.size());
    }
    dest.push_back('\n');
  }

  std::unique_ptr<spdlog::formatter> clone() const override { return std::make_unique<LineFormatter>(json_, journal_); }

 private:
  const bool json_;
  const bool journal_;
};

}  // namespace

bool stderr_is_journal() {
  const char* stream = std::getenv("JOURNAL_STREAM");
  if (!stream) return false;
  unsigned long long device = 0, inode = 0;
  char tail = 0;
  if (std::sscanf(stream, "%llu:%llu%c", &device, &inode, &tail) != 2) return false;
  struct stat st {};
  if (fstat(STDERR_FILENO, &st) == -1) return false;
  return st.st_dev == device && st.st_ino == inode;
}

void setup_logging(const std::string& level, const std::string& format) {
  const bool journal = stderr_is_journal();
  const bool json = format == "json";
  // Logs go to stderr so --run commands own stdout.
  std::shared_ptr<spdlog::logger> logger;
  if (!json && !journal) {
    logger = spdlog::stderr_color_mt("bscache");
    logger->set_pattern("%Y-%m-%d %H:%M:%S.%e %^%l%$ %v");
  } else {
    logger = spdlog::stderr_logger_mt("bscache");
    logger->set_formatter(std::make_unique<LineFormatter>(json, journal));
  }
  spdlog::set_default_logger(logger);
  spdlog::set_level(spdlog::level::from_str(level));
}

std::string log_list(std::span<const std::string> items) {
  std::string out;
  for (const auto& s : items) out += (out.empty() ? "" : ", ") + s;
  return out.empty() ? "(none)" : out;
}

}  // namespace bscache::proxy
