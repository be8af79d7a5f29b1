// Randomized differential test of bscache against its live upstream.
//
// Two client connections to the proxy send batches of concurrent writes,
// zeroes, trims, flushes and block-status queries (REQ_ONE and not). The test
// observes upstream directly before and after each batch, and every answer
// must describe, block by block, upstream's state before the batch or its
// state after it (the two are the same where no mutation of the batch
// reached). Describing a state means: no flag upstream did not report then,
// except ZERO where the block did read as zeroes (the spec's meaning of ZERO;
// nbdkit's memory plugin reports it for an allocated zero tail only when
// asked from inside that tail, so its flags depend on where a query starts).
// A query that raced a mutation is re-asked once everything settled, and
// that answer must describe the state after. Blocks two mutations of one
// batch reached are not checked: they may have been answered in the state
// between the two, which nobody observed. Data read through the proxy must
// equal data read directly.
//
// With CONTEXT (a qemu:dirty-bitmap:NAME or qemu:allocation-depth), the
// queries are about that meta context instead, and an answer describes a
// state only if it equals it: those contexts have no conservative value.
//
// Usage: differential PROXY_URI DIRECT_URI SEED OPERATIONS [CONTEXT]
#include <libnbd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bench/nbd_client.hpp"

namespace {

using bench::Handle;

// The meta context queried: base:allocation unless the command line names another.
std::string g_context = LIBNBD_CONTEXT_BASE_ALLOCATION;
bool exact() {
  return g_context != LIBNBD_CONTEXT_BASE_ALLOCATION;
}

Handle connect(const char* uri) {
  Handle h(nbd_create());
  if (!h) std::abort();
  nbd_add_meta_context(h.get(), g_context.c_str());
  if (nbd_connect_uri(h.get(), uri) == -1 || nbd_can_meta_context(h.get(), g_context.c_str()) != 1) {
    std::fprintf(stderr, "connect %s with %s: %s\n", uri, g_context.c_str(), nbd_get_error());
    std::exit(2);
  }
  return h;
}

struct Descriptor {
  uint64_t offset, length;
  uint32_t flags;
};

int collect(void* user, const char* context, uint64_t offset, uint32_t* entries, size_t n, int*) {
  if (g_context != context) return 0;
  auto* out = static_cast<std::vector<Descriptor>*>(user);
  for (size_t i = 0; i + 1 < n; i += 2) {
    out->push_back({offset, entries[i], entries[i + 1]});
    offset += entries[i];
  }
  return 0;
}

// One block-status call; returns false on an NBD error.
bool block_status(nbd_handle* h, uint64_t offset, uint64_t length, bool req_one, std::vector<Descriptor>& out) {
  out.clear();
  nbd_extent_callback cb{.callback = collect, .user_data = &out, .free = nullptr};
  return nbd_block_status(h, length, offset, cb, req_one ? LIBNBD_CMD_FLAG_REQ_ONE : 0) == 0;
}

// The unit of the per-block maps: every offset and length the test uses is a
// multiple of it.
constexpr uint64_t kBlock = 512;
// Upstream may change the reported allocation of whole units around a
// mutation (nbdkit's memory plugin: 32 KiB pages); treat a mutation as
// reaching its range rounded out to this.
constexpr uint64_t kReach = uint64_t{64} * 1024;

enum class Op { Write, Zero, Trim, Flush, Status, StatusOne, Read };
const char* name(Op op) {
  static const char* names[] = {"write", "zero", "trim", "flush", "status", "status-req-one", "read"};
  return names[static_cast<int>(op)];
}
bool mutates(Op op) {
  return op == Op::Write || op == Op::Zero || op == Op::Trim;
}

struct Action {
  Op op = Op::Flush;
  int client = 0;
  uint64_t offset = 0, length = 0;
  uint8_t pattern = 0;
  bool ok = true;
  std::vector<Descriptor> answer;
  std::string describe() const {
    std::ostringstream s;
    s << name(op) << " c" << client << " " << offset << "+" << length;
    if (op == Op::Write) s << " pattern " << int(pattern);
    if (!ok) s << " (failed: " << (nbd_get_error() ? "error" : "") << ")";
    return s.str();
  }
};

class Test {
 public:
  Test(const char* proxy_uri, const char* direct_uri, uint64_t seed)
      : rng_(seed), seed_(seed), direct_(connect(direct_uri)) {
    clients_.push_back(connect(proxy_uri));
    clients_.push_back(connect(proxy_uri));
    size_ = static_cast<uint64_t>(nbd_get_size(direct_.get()));
  }

  int run(int operations) {
    int done = 0;
    UpstreamState before = observe();
    while (done < operations) {
      std::vector<Action> batch;
      const int n = 1 + static_cast<int>(rng_() % 4);
      batch.reserve(static_cast<size_t>(n));
      for (int i = 0; i < n; ++i) batch.push_back(random_action());
      const std::vector<uint8_t> reach = mutations_reaching(batch);
      // What the batch may change is read now; the rest reads the same after.
      for (uint64_t b = 0; b < reach.size(); ++b) {
        if (reach[b]) reads_as_zeroes(before, b);
      }
      execute(batch);
      done += n;
      for (auto& a : batch) log(a.describe());
      UpstreamState after = observe();
      for (auto& a : batch) verify(a, batch, before, after, reach);
      before = std::move(after);
    }
    std::printf(
        "differential: %s, seed %llu, %d operations, %d answers checked (%d raced a mutation and were re-asked), "
        "%llu blocks left unchecked (reached by two mutations of one batch)\n",
        g_context.c_str(), static_cast<unsigned long long>(seed_), done, checked_, raced_,
        static_cast<unsigned long long>(skipped_));
    return 0;
  }

 private:
  Action random_action() {
    static const Op ops[] = {Op::Write,  Op::Write,     Op::Zero,      Op::Trim,      Op::Flush,
                             Op::Status, Op::StatusOne, Op::StatusOne, Op::StatusOne, Op::Read};
    Action a;
    a.op = ops[rng_() % std::size(ops)];
    a.client = static_cast<int>(rng_() % 2);
    a.pattern = static_cast<uint8_t>(rng_());
    const uint64_t blocks = size_ / 512;
    a.offset = (rng_() % blocks) * 512;
    const uint64_t max_len = (a.op == Op::Status || a.op == Op::StatusOne) ? size_ - a.offset : uint64_t{256} * 1024;
    a.length = std::min<uint64_t>(size_ - a.offset, 512 * (1 + rng_() % (max_len / 512)));
    if (a.op == Op::Flush) a.offset = a.length = 0;
    if (a.pattern == 0 && a.op == Op::Write) a.pattern = 1;  // all-zero writes are legal but make holes likely
    return a;
  }

  void perform(Action& a) {
    nbd_handle* h = clients_[static_cast<size_t>(a.client)].get();
    switch (a.op) {
      case Op::Write: {
        std::vector<uint8_t> data(a.length, a.pattern);
        a.ok = nbd_pwrite(h, data.data(), data.size(), a.offset, 0) == 0;
        break;
      }
      case Op::Zero: a.ok = nbd_zero(h, a.length, a.offset, 0) == 0; break;
      case Op::Trim: a.ok = nbd_trim(h, a.length, a.offset, 0) == 0; break;
      case Op::Flush: a.ok = nbd_flush(h, 0) == 0; break;
      case Op::Status:
      case Op::StatusOne: a.ok = block_status(h, a.offset, a.length, a.op == Op::StatusOne, a.answer); break;
      case Op::Read: a.ok = true; break;  // compared in verify(), after the batch settled
    }
  }

  void execute(std::vector<Action>& batch) {
    std::vector<std::thread> threads;
    threads.reserve(batch.size());
    for (auto& a : batch) threads.emplace_back([this, &a] { perform(a); });
    for (auto& t : threads) t.join();
  }

  static bool overlaps(const Action& a, const Action& b) {
    return a.offset < b.offset + b.length && b.offset < a.offset + a.length;
  }

  // Upstream at one moment, block by block, as a client sees it directly.
  struct UpstreamState {
    std::vector<uint32_t> flags;  // from status queries over the whole export, from offset 0
    std::vector<int8_t> zeroes;   // reads as all zeroes: 1 yes, 0 no, -1 not read yet
  };

  UpstreamState observe() {
    UpstreamState state{std::vector<uint32_t>(size_ / kBlock), std::vector<int8_t>(size_ / kBlock, -1)};
    std::vector<Descriptor> direct;
    uint64_t pos = 0;
    while (pos < size_) {
      const uint64_t length = std::min<uint64_t>(size_ - pos, uint64_t{1} << 30);
      if (!block_status(direct_.get(), pos, length, false, direct) || direct.empty()) die("direct status failed");
      for (const auto& u : direct) {
        if (u.offset % kBlock != 0 || u.length % kBlock != 0) die("upstream extent not a multiple of 512 bytes");
        const uint64_t end = std::min(u.offset + u.length, size_);
        for (uint64_t b = u.offset / kBlock; b < end / kBlock; ++b) state.flags[b] = u.flags;
        pos = end;
      }
    }
    return state;
  }

  // Reads (once) the 64 KiB around block b. Valid for `state` only while
  // upstream is still in that state: run() reads what a batch may change
  // before running it.
  bool reads_as_zeroes(UpstreamState& state, uint64_t b) {
    if (state.zeroes[b] < 0) {
      const uint64_t start = b * kBlock / kReach * kReach, end = std::min(start + kReach, size_);
      std::vector<uint8_t> data(end - start);
      if (nbd_pread(direct_.get(), data.data(), data.size(), start, 0) == -1) die("direct read failed");
      for (uint64_t i = start / kBlock; i < end / kBlock; ++i) {
        const auto first = data.begin() + static_cast<ptrdiff_t>(i * kBlock - start);
        state.zeroes[i] = std::all_of(first, first + kBlock, [](uint8_t x) { return x == 0; });
      }
    }
    return state.zeroes[b] == 1;
  }

  // Could a client asking upstream in `state` have been told `flags` for block b?
  bool describes(uint32_t flags, UpstreamState& state, uint64_t b) {
    if (exact()) return flags == state.flags[b];
    const uint32_t extra = flags & ~state.flags[b];
    return extra == 0 || (extra == LIBNBD_STATE_ZERO && reads_as_zeroes(state, b));
  }

  // For every block, how many mutations of the batch may have changed it.
  std::vector<uint8_t> mutations_reaching(const std::vector<Action>& batch) const {
    std::vector<uint8_t> reach(size_ / kBlock, 0);
    for (const auto& m : batch) {
      if (!mutates(m.op)) continue;
      const uint64_t start = m.offset / kReach * kReach;
      const uint64_t end = std::min(size_, (m.offset + m.length + kReach - 1) / kReach * kReach);
      for (uint64_t b = start / kBlock; b < end / kBlock; ++b) ++reach[b];
    }
    return reach;
  }

  void verify(Action& a, const std::vector<Action>& batch, UpstreamState& before, UpstreamState& after,
              const std::vector<uint8_t>& reach) {
    if (!a.ok) die("operation failed: " + a.describe() + ": " + (nbd_get_error() ? nbd_get_error() : ""));
    if (a.op == Op::Read) {
      compare_data(a.offset, a.length);
      ++checked_;
      return;
    }
    if (a.op != Op::Status && a.op != Op::StatusOne) return;
    // Answered while the batch ran: it may describe either side of a mutation.
    check_answer(a, before, after, &reach);
    ++checked_;
    bool raced = false;
    for (const auto& b : batch) raced |= mutates(b.op) && overlaps(a, b);
    if (raced) {
      // Everything settled now: what the cache kept must describe the state after.
      Action again = a;
      if (!block_status(clients_[static_cast<size_t>(a.client)].get(), a.offset, a.length, a.op == Op::StatusOne,
                        again.answer)) {
        die("re-ask failed: " + a.describe());
      }
      check_answer(again, after, after, nullptr);
      ++raced_;
    }
  }

  // The answer's shape, then its flags: every block each descriptor covers
  // (only the last may run past the request; it is checked to the export's
  // end) must be described in `before` or in `after`. Blocks `reach` counts
  // two or more mutations for are skipped.
  void check_answer(const Action& a, UpstreamState& before, UpstreamState& after, const std::vector<uint8_t>* reach) {
    if (a.answer.empty()) die("empty block-status answer: " + a.describe());
    if (a.answer.front().offset != a.offset) die("answer does not start at the offset: " + a.describe());
    uint64_t total = 0;
    for (const auto& d : a.answer) total += d.length;
    if (a.op == Op::StatusOne && (a.answer.size() != 1 || total > a.length)) {
      die("REQ_ONE answer has " + std::to_string(a.answer.size()) + " descriptors, " + std::to_string(total) +
          " bytes: " + a.describe());
    }
    for (const auto& d : a.answer) {
      if (d.offset >= a.offset + a.length) break;  // only the last may run past the end
      if (d.offset % kBlock != 0 || d.length % kBlock != 0) die("descriptor not a multiple of 512: " + a.describe());
      const uint64_t end = std::min(d.offset + d.length, size_);
      for (uint64_t b = d.offset / kBlock; b < end / kBlock; ++b) {
        if (reach && (*reach)[b] >= 2) {
          ++skipped_;
          continue;
        }
        // Unreached blocks read the same before and after: read them in `after`.
        UpstreamState& then = (reach && (*reach)[b] == 0) ? after : before;
        if (!describes(d.flags, then, b) && !describes(d.flags, after, b)) {
          die("proxy said flags " + std::to_string(d.flags) + " for " + std::to_string(d.offset) + "+" +
              std::to_string(d.length) + " but at " + std::to_string(b * kBlock) + " upstream reported flags " +
              std::to_string(before.flags[b]) + " before the batch and " + std::to_string(after.flags[b]) +
              " after it, and the block " + (reads_as_zeroes(after, b) ? "reads" : "does not read") +
              " as zeroes now (answer to " + a.describe() + ")");
        }
      }
    }
  }

  void compare_data(uint64_t offset, uint64_t length) {
    std::vector<uint8_t> via_proxy(length), direct(length);
    if (nbd_pread(clients_[0].get(), via_proxy.data(), length, offset, 0) == -1 ||
        nbd_pread(direct_.get(), direct.data(), length, offset, 0) == -1) {
      die("read failed");
    }
    if (via_proxy != direct) die("data differs at " + std::to_string(offset) + "+" + std::to_string(length));
  }

  void log(std::string line) {
    history_.push_back(std::move(line));
    if (history_.size() > 60) history_.pop_front();
  }

  [[noreturn]] void die(const std::string& why) {
    std::fprintf(stderr, "FAILED (seed %llu): %s\nlast operations:\n", static_cast<unsigned long long>(seed_),
                 why.c_str());
    for (const auto& line : history_) std::fprintf(stderr, "  %s\n", line.c_str());
    std::exit(1);
  }

  std::mt19937_64 rng_;
  uint64_t seed_;
  Handle direct_;
  std::vector<Handle> clients_;
  uint64_t size_ = 0;
  std::deque<std::string> history_;
  int checked_ = 0, raced_ = 0;
  uint64_t skipped_ = 0;
};

}  // namespace

int main(int argc, char* argv[]) {
  if (argc != 5 && argc != 6) {
    std::fprintf(stderr, "usage: %s PROXY_URI DIRECT_URI SEED OPERATIONS [CONTEXT]\n", argv[0]);
    return 2;
  }
  if (argc == 6) g_context = argv[5];
  Test test(argv[1], argv[2], std::strtoull(argv[3], nullptr, 10));
  return test.run(std::atoi(argv[4]));
}
