// hit_latency URI SIZE SECONDS DEPTH
// REQ_ONE block-status requests at random offsets with DEPTH requests in
// flight, for SECONDS. Prints "requests_per_second microseconds_per_request".
// Run it twice against a cache: the first pass warms it.
#include <random>
#include <string_view>
#include <vector>

#include "bench/nbd_client.hpp"

namespace {
int ignore_extent(void*, const char*, uint64_t, uint32_t*, size_t, int*) {
  return 0;
}
}  // namespace

int main(int argc, char* argv[]) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s URI SIZE SECONDS DEPTH\n", argv[0]);
    return 2;
  }
  auto h = bench::connect(argv[1]);
  const uint64_t size = std::strtoull(argv[2], nullptr, 10);
  const double limit = std::atof(argv[3]);
  const int depth = std::atoi(argv[4]);
  std::mt19937_64 rng(42);
  const uint64_t blocks = size / 4096;
  uint64_t done = 0;
  const auto start = std::chrono::steady_clock::now();
  while (bench::seconds_since(start) < limit) {
    // Keep DEPTH requests in flight, then reap.
    for (int i = 0; i < depth; ++i) {
      nbd_extent_callback cb{.callback = ignore_extent, .user_data = nullptr, .free = nullptr};
      if (nbd_aio_block_status(h.get(), 4096, (rng() % blocks) * 4096, cb, NBD_NULL_COMPLETION,
                               LIBNBD_CMD_FLAG_REQ_ONE) == -1) {
        std::fprintf(stderr, "%s\n", nbd_get_error());
        return 1;
      }
    }
    while (nbd_aio_in_flight(h.get()) > 0) {
      if (nbd_poll(h.get(), -1) == -1) {
        std::fprintf(stderr, "%s\n", nbd_get_error());
        return 1;
      }
      while (nbd_aio_peek_command_completed(h.get()) > 0) {
        if (nbd_aio_command_completed(h.get(), static_cast<uint64_t>(nbd_aio_peek_command_completed(h.get()))) == -1) {
          std::fprintf(stderr, "%s\n", nbd_get_error());
          return 1;
        }
        ++done;
      }
    }
  }
  const double elapsed = bench::seconds_since(start);
  std::printf("%.0f %.2f\n", done / elapsed, elapsed * 1e6 / static_cast<double>(done) * depth);
  return 0;
}
