// write_mix URI QUERIES [--populate N]
// Walks the image with REQ_ONE block status (as qemu does) and writes 4 KiB
// at a random offset every 10 queries. Prints "seconds queries writes".
// With --populate N, first writes N 4 KiB blocks spread over the image (to
// give a memory upstream N data extents) and exits.
#include <random>
#include <string>
#include <vector>

#include "bench/nbd_client.hpp"

int main(int argc, char* argv[]) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s URI QUERIES [--populate N]\n", argv[0]);
    return 2;
  }
  auto h = bench::connect(argv[1]);
  const uint64_t size = static_cast<uint64_t>(nbd_get_size(h.get()));
  std::vector<uint8_t> block(4096, 0xa5);
  std::mt19937_64 rng(7);
  if (argc == 4 && std::string(argv[2]) == "--populate") {
    const uint64_t n = std::strtoull(argv[3], nullptr, 10);
    for (uint64_t i = 0; i < n; ++i) {
      if (nbd_pwrite(h.get(), block.data(), block.size(), (size / n) * i / 4096 * 4096, 0) == -1) return 1;
    }
    return 0;
  }
  const uint64_t queries = std::strtoull(argv[2], nullptr, 10);
  uint64_t offset = 0, writes = 0;
  const auto start = std::chrono::steady_clock::now();
  for (uint64_t q = 0; q < queries; ++q) {
    if (offset >= size) offset = 0;  // wrap: walk again
    bench::FirstExtent first;
    nbd_extent_callback cb{.callback = bench::FirstExtent::callback, .user_data = &first, .free = nullptr};
    if (nbd_block_status(h.get(), std::min<uint64_t>(size - offset, 1u << 30), offset, cb, LIBNBD_CMD_FLAG_REQ_ONE) ==
        -1) {
      std::fprintf(stderr, "%s\n", nbd_get_error());
      return 1;
    }
    offset += first.length ? first.length : 4096;
    if (q % 10 == 9) {
      const uint64_t at = (rng() % (size / 4096)) * 4096;
      if (nbd_pwrite(h.get(), block.data(), block.size(), at, 0) == -1) return 1;
      ++writes;
    }
  }
  std::printf("%.3f %llu %llu\n", bench::seconds_since(start), static_cast<unsigned long long>(queries),
              static_cast<unsigned long long>(writes));
  return 0;
}
