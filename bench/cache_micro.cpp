// Google Benchmark micro-benchmarks of ExtentCache: lookup and store per
// second with 10^3 .. 10^6 cached extents.
#include <benchmark/benchmark.h>

#include <memory>
#include <random>

#include "cache/extent_cache.hpp"

namespace {

using bscache::cache::CacheLimits;
using bscache::cache::Extent;
using bscache::cache::ExtentCache;

// n alternating data/hole extents of 64 KiB. (On the heap: a cache is
// registered with its budget by address, so it does not move.)
std::unique_ptr<ExtentCache> filled(int64_t n) {
  CacheLimits limits;
  limits.max_extents = static_cast<size_t>(n) * 2;
  auto cache = std::make_unique<ExtentCache>(limits);
  const auto stamp = cache->now();
  for (int64_t i = 0; i < n; ++i) {
    cache->store(static_cast<uint64_t>(i) * 65536, 65536, static_cast<uint32_t>(i % 2) * 3, stamp);
  }
  return cache;
}

void BM_Lookup(benchmark::State& state) {
  auto cache = filled(state.range(0));
  std::mt19937_64 rng(1);
  std::vector<Extent> out;
  out.reserve(1);
  const uint64_t span = static_cast<uint64_t>(state.range(0)) * 65536;
  // Google Benchmark's loop idiom: the analyzer sees `_` as a dead store.
  for (auto _ : state) {  // NOLINT(clang-analyzer-deadcode.DeadStores)
    out.clear();
    benchmark::DoNotOptimize(cache->lookup(rng() % span, 4096, out, 1));
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_Lookup)->RangeMultiplier(10)->Range(1000, 1000000);

void BM_Store(benchmark::State& state) {
  auto cache = filled(state.range(0));
  std::mt19937_64 rng(2);
  const uint64_t span = static_cast<uint64_t>(state.range(0)) * 65536;
  const auto stamp = cache->now();
  for (auto _ : state) {  // NOLINT(clang-analyzer-deadcode.DeadStores): see BM_Lookup
    cache->store(rng() % span / 4096 * 4096, 4096, static_cast<uint32_t>(rng() % 4), stamp);
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_Store)->RangeMultiplier(10)->Range(1000, 1000000);

}  // namespace

BENCHMARK_MAIN();
