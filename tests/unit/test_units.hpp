// Sizes and base:allocation flag values the unit tests share. One home, so
// that unit_tests also builds as one translation unit (BSCACHE_UNITY), where
// two files' constants of one name would collide.
#pragma once

#include <cstdint>

namespace bscache::test {

inline constexpr uint64_t KiB = 1024, MiB = 1024 * KiB, GiB = 1024 * MiB;
// NBD_STATE_HOLE | NBD_STATE_ZERO, NBD_STATE_ZERO, and neither.
inline constexpr uint32_t kHoleZero = 3, kZero = 2, kData = 0;

}  // namespace bscache::test
