// Randomized differential test of bscache against its live upstream.
//
// Two client connections to the proxy send batches of concurrent writes,
// zeroes, trims, flushes and block-status queries (REQ_ONE and not). After
// each batch every answer is checked against what the upstream reports
// directly: the proxy's flags must be a subset of upstream's for every byte
// (a query that raced a mutation on an overlapping range may describe either
// side of it, so it is then re-asked once everything settled and that answer
// must be exact). Data read through the proxy must equal data read directly.
//
// Usage: differential PROXY_URI DIRECT_URI SEED OPERATIONS
#include <libnbd.h>

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

using bench::connect;
using bench::Handle;

struct Descriptor {
  uint64_t offset, length;
  uint32_t flags;
};

int collect(void* user, const char* context, uint64_t offset, uint32_t* entries, size_t n, int*) {
  if (std::strcmp(context, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0) return 0;
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
    int done = 0, checked = 0;
    while (done < operations) {
      std::vector<Action> batch;
      const int n = 1 + static_cast<int>(rng_() % 4);
      for (int i = 0; i < n; ++i) batch.push_back(random_action());
      execute(batch);
      done += n;
      for (auto& a : batch) log(a.describe());
      for (auto& a : batch) checked += verify(a, batch);
    }
    std::printf("differential: seed %llu, %d operations, %d answers checked\n", static_cast<unsigned long long>(seed_),
                done, checked);
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
    const uint64_t max_len = (a.op == Op::Status || a.op == Op::StatusOne) ? size_ - a.offset : 256 * 1024;
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
    for (auto& a : batch) threads.emplace_back([this, &a] { perform(a); });
    for (auto& t : threads) t.join();
  }

  static bool overlaps(const Action& a, const Action& b) {
    return a.offset < b.offset + b.length && b.offset < a.offset + a.length;
  }

  // Returns 1 if an answer was checked.
  int verify(Action& a, const std::vector<Action>& batch) {
    if (!a.ok) die("operation failed: " + a.describe() + ": " + (nbd_get_error() ? nbd_get_error() : ""));
    if (a.op == Op::Read) {
      compare_data(a.offset, a.length);
      return 1;
    }
    if (a.op != Op::Status && a.op != Op::StatusOne) return 0;
    bool raced = false;
    for (const auto& b : batch) raced |= mutates(b.op) && overlaps(a, b);
    if (!raced) {
      check_answer(a);
    } else {
      // Everything settled now: ask again, and this answer must be exact.
      Action again = a;
      if (!block_status(clients_[static_cast<size_t>(a.client)].get(), a.offset, a.length, a.op == Op::StatusOne,
                        again.answer)) {
        die("re-ask failed: " + a.describe());
      }
      check_answer(again);
    }
    return 1;
  }

  void check_answer(const Action& a) {
    if (a.answer.empty()) die("empty block-status answer: " + a.describe());
    if (a.answer.front().offset != a.offset) die("answer does not start at the offset: " + a.describe());
    uint64_t total = 0;
    for (const auto& d : a.answer) total += d.length;
    if (a.op == Op::StatusOne && (a.answer.size() != 1 || total > a.length)) {
      die("REQ_ONE answer has " + std::to_string(a.answer.size()) + " descriptors, " + std::to_string(total) +
          " bytes: " + a.describe());
    }
    for (const auto& d : a.answer) {
      if (d.offset >= a.offset + a.length) break;  // only the last may run past the end; not checked
      check_subset(d, a);
    }
  }

  // The proxy's flags for `d` must be a subset of upstream's for every byte.
  void check_subset(const Descriptor& d, const Action& a) {
    uint64_t pos = d.offset;
    const uint64_t end = std::min(d.offset + d.length, size_);
    std::vector<Descriptor> direct;
    while (pos < end) {
      if (!block_status(direct_.get(), pos, end - pos, false, direct) || direct.empty()) die("direct status failed");
      for (const auto& u : direct) {
        if (u.offset >= end) break;
        if ((d.flags & ~u.flags) != 0) {
          die("proxy said flags " + std::to_string(d.flags) + " for " + std::to_string(d.offset) + "+" +
              std::to_string(d.length) + " but upstream says " + std::to_string(u.flags) + " at " +
              std::to_string(u.offset) + "+" + std::to_string(u.length) + " (answer to " + a.describe() + ")");
        }
        pos = u.offset + u.length;
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
};

}  // namespace

int main(int argc, char* argv[]) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s PROXY_URI DIRECT_URI SEED OPERATIONS\n", argv[0]);
    return 2;
  }
  Test test(argv[1], argv[2], std::strtoull(argv[3], nullptr, 10));
  return test.run(std::atoi(argv[4]));
}
