#include "proxy/config_file.hpp"

#include <map>

namespace bscache::proxy {

namespace {
std::string_view trim(std::string_view s) {
  const auto first = s.find_first_not_of(" \t\r");
  if (first == std::string_view::npos) return {};
  return s.substr(first, s.find_last_not_of(" \t\r") - first + 1);
}
}  // namespace

std::variant<std::vector<ConfigEntry>, std::string> parse_config(std::string_view text) {
  std::vector<ConfigEntry> entries;
  std::map<std::string, unsigned, std::less<>> seen;  // key -> line
  unsigned number = 0;
  while (!text.empty()) {
    const auto newline = text.find('\n');
    const std::string_view line = trim(text.substr(0, newline));
    text = newline == std::string_view::npos ? std::string_view() : text.substr(newline + 1);
    ++number;
    if (line.empty() || line[0] == '#' || line[0] == ';') continue;
    const std::string where = "line " + std::to_string(number) + ": ";
    if (line[0] == '[') return where + "sections are not used: every key stands on its own";
    const auto equals = line.find('=');
    if (equals == std::string_view::npos) return where + "expected 'key = value'";
    const std::string_view key = trim(line.substr(0, equals));
    if (key.empty()) return where + "no key before '='";
    if (auto earlier = seen.find(key); earlier != seen.end()) {
      return where + "key '" + std::string(key) + "' already given on line " + std::to_string(earlier->second);
    }
    seen.emplace(std::string(key), number);
    entries.push_back({std::string(key), std::string(trim(line.substr(equals + 1))), number});
  }
  return entries;
}

}  // namespace bscache::proxy
