// Where and how bscache logs: stderr, as text (with colours on a terminal) or
// as JSON lines (--log-format json); under systemd, each line carries its
// priority for the journal.
#pragma once

#include <span>
#include <string>

namespace bscache::proxy {

// Installs the default logger. `level` and `format` were validated by the
// option parser ("info", "text"|"json").
void setup_logging(const std::string& level, const std::string& format);

// True if stderr is the journal stream systemd set up for us: $JOURNAL_STREAM
// ("DEVICE:INODE") names the file stderr is open on. Checking the inode, not
// just the variable, matters: a child of a service inherits the variable even
// when its stderr was redirected to a file.
bool stderr_is_journal();

// Names for a log line: "a, b, c", or "(none)".
std::string log_list(std::span<const std::string> items);

}  // namespace bscache::proxy
