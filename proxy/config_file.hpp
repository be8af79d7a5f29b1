// The --config file's syntax, kept apart from what the keys mean (options.cpp
// checks each key and value against the options table).
//
//   # a comment (a whole line starting with # or ;)
//   upstream = nbd+unix:///?socket=/run/nbdkit.sock
//   cache-max-memory = 1G
//
// One "key = value" per line; the value is the rest of the line with the
// spaces around it removed (no quoting, no inline comments: values such as
// --run commands may hold any character). Why not TOML or Boost's INI
// parser: errors must name the line, and a flat list of keys is all the
// options need.
#pragma once

#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace bscache::proxy {

struct ConfigEntry {
  std::string key;
  std::string value;
  unsigned line = 0;  // 1-based
};

// The entries in file order, or why the text is not a config file
// ("line N: ..."). A key given twice is an error.
std::variant<std::vector<ConfigEntry>, std::string> parse_config(std::string_view text);

}  // namespace bscache::proxy
