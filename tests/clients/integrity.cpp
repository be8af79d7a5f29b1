// Data-integrity stress client: random reads and writes of random sizes from
// several client connections at once, every read checked against a model.
//
// Each client connection is driven by its own thread with up to DEPTH
// commands in flight (libnbd aio), so bscache sees pipelined requests from
// every connection and spreads them over its upstream connections. Sizes run
// from 1 byte to 32 MiB (mostly small), offsets are arbitrary bytes. Even
// clients use structured replies, odd ones simple replies.
//
// The model is the disk's expected contents. Commands that overlap never run
// at the same time (a range lock shared by all threads; reads may share), so
// every read has exactly one right answer: the model at the moment it
// completes. A write updates the model when upstream acknowledged it.
// At the end every connection reads the whole disk and compares, and the
// model is written to OUT_FILE for the caller to compare with the upstream file.
//
// Usage: integrity URI INITIAL_FILE OUT_FILE SEED CLIENTS DEPTH SECONDS MAX_OPS
// Prints one summary line; exits 1 with the failing operation on any mismatch.
#include <libnbd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <list>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr uint64_t kMaxRequest = 32u << 20;
constexpr uint64_t kMaxBytesInFlight = 64u << 20;  // per client: keeps our own memory bounded

struct Close {
  void operator()(nbd_handle* h) const { nbd_close(h); }
};
using Handle = std::unique_ptr<nbd_handle, Close>;

[[noreturn]] void die(const std::string& message) {
  std::fprintf(stderr, "integrity: FAIL: %s\n", message.c_str());
  std::fflush(stderr);
  std::_Exit(1);
}

// Odd-numbered clients ask for simple replies (holes arrive as zeroes), even ones for structured replies.
Handle connect(const char* uri, int client) {
  Handle h(nbd_create());
  if (!h) die("nbd_create");
  if (client % 2 == 1) nbd_set_request_structured_replies(h.get(), false);
  if (nbd_connect_uri(h.get(), uri) == -1) die(std::string("connect: ") + nbd_get_error());
  return h;
}

// Ranges in use: a write excludes everything overlapping it; reads share.
class RangeLock {
 public:
  bool try_lock(uint64_t offset, uint64_t length, bool write) {
    std::lock_guard lock(mutex_);
    for (const auto& r : held_) {
      if (offset < r.offset + r.length && r.offset < offset + length && (write || r.write)) return false;
    }
    held_.push_back({offset, length, write});
    return true;
  }
  void unlock(uint64_t offset, uint64_t length, bool write) {
    std::lock_guard lock(mutex_);
    for (auto it = held_.begin(); it != held_.end(); ++it) {
      if (it->offset == offset && it->length == length && it->write == write) {
        held_.erase(it);
        return;
      }
    }
    die("unlock of a range not held");
  }

 private:
  struct Range {
    uint64_t offset, length;
    bool write;
  };
  std::mutex mutex_;
  std::list<Range> held_;
};

struct Shared {
  const char* uri;
  std::vector<uint8_t> model;
  RangeLock ranges;
  std::chrono::steady_clock::time_point deadline;
  std::atomic<long> ops_left;
  std::atomic<uint64_t> reads{0}, writes{0}, flushes{0}, bytes_read{0}, bytes_written{0}, large{0};
};

enum class Kind { Read, Write, Flush };

struct Op {
  Kind kind = Kind::Read;
  uint64_t offset = 0, length = 0;
  std::vector<uint8_t> buffer;
  int64_t cookie = 0;
};

std::string describe(const Op& op, int client) {
  const char* names[] = {"read", "write", "flush"};
  return std::string(names[static_cast<int>(op.kind)]) + " on client " + std::to_string(client) + " at " +
         std::to_string(op.offset) + "+" + std::to_string(op.length);
}

uint64_t random_length(std::mt19937_64& rng, uint64_t size) {
  const unsigned bucket = rng() % 100;
  uint64_t length;
  if (bucket < 50) {
    length = 1 + rng() % 4096;  // mostly small
  } else if (bucket < 75) {
    length = 4097 + rng() % (size_t{256} * 1024);
  } else if (bucket < 90) {
    length = (size_t{256} * 1024) + rng() % (4u << 20);
  } else if (bucket < 97) {
    length = (4u << 20) + rng() % (kMaxRequest - (4u << 20) + 1);
  } else {
    length = kMaxRequest;  // the largest a client may send
  }
  return std::min(length, size);
}

void fill_random(std::mt19937_64& rng, std::vector<uint8_t>& buffer) {
  size_t i = 0;
  for (; i + 8 <= buffer.size(); i += 8) {
    const uint64_t v = rng();
    std::memcpy(buffer.data() + i, &v, 8);
  }
  for (; i < buffer.size(); ++i) buffer[i] = static_cast<uint8_t>(rng());
}

void compare(const Shared& s, const Op& op, int client) {
  const uint8_t* want = s.model.data() + op.offset;
  if (std::memcmp(op.buffer.data(), want, op.length) == 0) return;
  uint64_t first = 0;
  while (op.buffer[first] == want[first]) ++first;
  uint64_t differing = 0;
  for (uint64_t i = first; i < op.length; ++i) differing += op.buffer[i] != want[i];
  char detail[160];
  std::snprintf(detail, sizeof detail, ": first difference at offset %llu (got 0x%02x, want 0x%02x), %llu bytes differ",
                static_cast<unsigned long long>(op.offset) + first, op.buffer[first], want[first],
                static_cast<unsigned long long>(differing));
  die("data mismatch in " + describe(op, client) + detail);
}

void run_client(Shared& s, int client, unsigned depth, uint64_t seed) {
  Handle handle = connect(s.uri, client);
  nbd_handle* h = handle.get();
  std::mt19937_64 rng(seed * 1000003 + static_cast<uint64_t>(client));
  const uint64_t size = s.model.size();
  std::list<Op> in_flight;
  uint64_t bytes_in_flight = 0;
  std::unique_ptr<Op> next;  // generated but waiting for its range

  auto finish = [&](std::list<Op>::iterator it) {
    Op& op = *it;
    const int rc = nbd_aio_command_completed(h, op.cookie);
    if (rc == 0) return false;
    if (rc == -1) die(describe(op, client) + " failed: " + (nbd_get_error() ? nbd_get_error() : "?"));
    if (op.kind == Kind::Read) {
      compare(s, op, client);
      s.reads++;
      s.bytes_read += op.length;
    } else if (op.kind == Kind::Write) {
      std::memcpy(s.model.data() + op.offset, op.buffer.data(), op.length);  // range held: nobody reads it now
      s.writes++;
      s.bytes_written += op.length;
    } else {
      s.flushes++;
    }
    if (op.length >= (4u << 20)) s.large++;
    if (op.kind != Kind::Flush) s.ranges.unlock(op.offset, op.length, op.kind == Kind::Write);
    bytes_in_flight -= op.length;
    return true;
  };

  for (;;) {
    const bool more = std::chrono::steady_clock::now() < s.deadline && s.ops_left.load() > 0;
    if (!more && in_flight.empty()) break;
    if (more && !next) {
      auto op = std::make_unique<Op>();
      const unsigned r = rng() % 100;
      op->kind = r < 2 ? Kind::Flush : r < 51 ? Kind::Write : Kind::Read;
      if (op->kind != Kind::Flush) {
        op->length = random_length(rng, size);
        op->offset = rng() % (size - op->length + 1);
        if (rng() % 4 == 0) op->offset &= ~uint64_t{4095};  // some aligned
      }
      next = std::move(op);
    }
    // Start it if there is room and its range is free.
    if (more && next && in_flight.size() < depth &&
        (in_flight.empty() || bytes_in_flight + next->length <= kMaxBytesInFlight) &&
        (next->kind == Kind::Flush || s.ranges.try_lock(next->offset, next->length, next->kind == Kind::Write))) {
      s.ops_left--;
      Op& op = in_flight.emplace_back(std::move(*next));
      next.reset();
      op.buffer.resize(op.length);
      if (op.kind == Kind::Write) {
        fill_random(rng, op.buffer);
        op.cookie = nbd_aio_pwrite(h, op.buffer.data(), op.length, op.offset, NBD_NULL_COMPLETION, 0);
      } else if (op.kind == Kind::Read) {
        std::memset(op.buffer.data(), 0xA5, op.length);  // not what a failed read would leave by chance
        op.cookie = nbd_aio_pread(h, op.buffer.data(), op.length, op.offset, NBD_NULL_COMPLETION, 0);
      } else {
        op.cookie = nbd_aio_flush(h, NBD_NULL_COMPLETION, 0);
      }
      if (op.cookie == -1) die(describe(op, client) + " could not start: " + nbd_get_error());
      bytes_in_flight += op.length;
      continue;
    }
    if (nbd_poll(h, 10) == -1) die(std::string("poll: ") + nbd_get_error());
    for (auto it = in_flight.begin(); it != in_flight.end();) it = finish(it) ? in_flight.erase(it) : std::next(it);
  }
}

// Every connection reads the whole disk; it must equal the model.
void verify_all(const Shared& s, int clients) {
  const uint64_t size = s.model.size();
  for (int c = 0; c < clients; ++c) {
    Handle h = connect(s.uri, c);
    Op op;
    op.kind = Kind::Read;
    for (op.offset = 0; op.offset < size; op.offset += op.length) {
      op.length = std::min<uint64_t>(kMaxRequest, size - op.offset);
      op.buffer.assign(op.length, 0xA5);
      if (nbd_pread(h.get(), op.buffer.data(), op.length, op.offset, 0) == -1) {
        die("final " + describe(op, c) + " failed: " + nbd_get_error());
      }
      compare(s, op, c);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 9) {
    std::fprintf(stderr, "usage: integrity URI INITIAL_FILE OUT_FILE SEED CLIENTS DEPTH SECONDS MAX_OPS\n");
    return 2;
  }
  Shared s;
  s.uri = argv[1];
  {
    std::ifstream in(argv[2], std::ios::binary);
    s.model.assign(std::istreambuf_iterator<char>(in), {});
    if (s.model.empty()) die(std::string("cannot read ") + argv[2]);
  }
  const uint64_t seed = std::strtoull(argv[4], nullptr, 10);
  const int clients = std::atoi(argv[5]);
  const unsigned depth = static_cast<unsigned>(std::atoi(argv[6]));
  s.deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(static_cast<long>(1000 * std::atof(argv[7])));
  s.ops_left = std::atol(argv[8]);

  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(clients));
  for (int c = 0; c < clients; ++c) threads.emplace_back(run_client, std::ref(s), c, depth, seed);
  for (auto& t : threads) t.join();
  verify_all(s, clients);

  std::ofstream out(argv[3], std::ios::binary);
  out.write(reinterpret_cast<const char*>(s.model.data()), static_cast<std::streamsize>(s.model.size()));
  if (!out) die(std::string("cannot write ") + argv[3]);
  std::printf(
      "integrity: seed %llu, %d clients x depth %u: %llu reads (%llu MiB), %llu writes (%llu MiB), "
      "%llu flushes, %llu of them >= 4 MiB; final read-back of every connection equal\n",
      static_cast<unsigned long long>(seed), clients, depth, static_cast<unsigned long long>(s.reads.load()),
      static_cast<unsigned long long>(s.bytes_read.load() >> 20), static_cast<unsigned long long>(s.writes.load()),
      static_cast<unsigned long long>(s.bytes_written.load() >> 20), static_cast<unsigned long long>(s.flushes.load()),
      static_cast<unsigned long long>(s.large.load()));
  return 0;
}
