// Unaligned requests of clients that did not agree to upstream's block size:
// what goes upstream (alignment.hpp), and which writes may run together while
// a read-modify-write holds its blocks (write_order.hpp).
#include <gtest/gtest.h>

#include "policy/alignment.hpp"
#include "policy/write_order.hpp"

namespace bscache::policy {
namespace {

constexpr uint64_t kSize = 1 << 20;  // the export
constexpr uint32_t kBlock = 512;

TEST(Alignment, AlignedRequestsAndBlockOneNeedNothing) {
  EXPECT_TRUE(is_aligned({512, 1024}, kBlock, kSize));
  EXPECT_TRUE(is_aligned({1, 7}, 1, kSize));
  EXPECT_FALSE(is_aligned({1, 511}, kBlock, kSize));
  EXPECT_FALSE(is_aligned({512, 1}, kBlock, kSize));
  EXPECT_TRUE(is_aligned({512, 518}, kBlock, 1030)) << "the end of a short last block is a boundary";
}

TEST(Alignment, WidenCoversTheBlocksTouchedAndStopsAtTheEnd) {
  EXPECT_EQ(widen({1, 1}, kBlock, kSize), (ByteRange{0, 512}));
  EXPECT_EQ(widen({511, 2}, kBlock, kSize), (ByteRange{0, 1024}));
  EXPECT_EQ(widen({1020, 5}, kBlock, 1030), (ByteRange{512, 518})) << "capped at the export's end";
  EXPECT_EQ(widen({5, 5}, 1, kSize), (ByteRange{5, 5}));
}

TEST(Alignment, InteriorIsTheWholeBlocksInside) {
  EXPECT_EQ(interior({1, 1023}, kBlock, kSize), (ByteRange{512, 512}));
  EXPECT_EQ(interior({1, 600}, kBlock, kSize), std::nullopt);
  EXPECT_EQ(interior({1, 1029}, kBlock, 1030), (ByteRange{512, 518})) << "up to the export's end";
}

TEST(Alignment, EdgesAreReadModifyWrittenAndTheMiddleGoesAsItIs) {
  auto plan = plan_edges({100, 1000}, kBlock, kSize);  // [100, 1100): blocks 0, 1, 2
  EXPECT_EQ(plan.whole, (ByteRange{0, 1536}));
  EXPECT_EQ(plan.head, (ByteRange{0, 512}));
  EXPECT_EQ(plan.tail, (ByteRange{1024, 512}));
  EXPECT_EQ(plan.middle, (ByteRange{512, 512}));

  plan = plan_edges({100, 10}, kBlock, kSize);  // inside one block: one edge, no middle
  EXPECT_EQ(plan.head, (ByteRange{0, 512}));
  EXPECT_EQ(plan.tail, std::nullopt);
  EXPECT_EQ(plan.middle, std::nullopt);

  plan = plan_edges({512, 600}, kBlock, kSize);  // aligned start: only a tail
  EXPECT_EQ(plan.head, std::nullopt);
  EXPECT_EQ(plan.middle, (ByteRange{512, 512}));
  EXPECT_EQ(plan.tail, (ByteRange{1024, 512}));

  plan = plan_edges({500, 12}, kBlock, kSize);  // ends on a boundary: the head only
  EXPECT_EQ(plan.head, (ByteRange{0, 512}));
  EXPECT_EQ(plan.tail, std::nullopt);
  EXPECT_EQ(plan.middle, std::nullopt);

  plan = plan_edges({1000, 30}, kBlock, 1030);  // up to the end of a short last block: no tail to read
  EXPECT_EQ(plan.head, (ByteRange{512, 512}));
  EXPECT_EQ(plan.middle, (ByteRange{1024, 6}));
  EXPECT_EQ(plan.tail, std::nullopt);
}

TEST(WriteOrder, WritesRunTogetherButNotWithAReadModifyWriteOfTheirBlocks) {
  WriteOrder order;
  auto w1 = order.claim(0, 4096, false);
  auto w2 = order.claim(1024, 4096, false);
  EXPECT_TRUE(w1.granted);
  EXPECT_TRUE(w2.granted) << "plain writes are not ordered among themselves";
  auto rmw = order.claim(0, 512, true);
  EXPECT_FALSE(rmw.granted) << "waits for the overlapping write before it";
  auto later = order.claim(256, 10, false);
  EXPECT_FALSE(later.granted) << "a write after a waiting read-modify-write waits behind it";
  auto elsewhere = order.claim(8192, 512, false);
  EXPECT_TRUE(elsewhere.granted) << "other blocks are not held up";
  EXPECT_TRUE(order.release(w2.id).empty()) << "w1 still overlaps the read-modify-write";
  EXPECT_EQ(order.release(w1.id), std::vector<WriteOrder::Id>{rmw.id});
  EXPECT_EQ(order.release(rmw.id), std::vector<WriteOrder::Id>{later.id});
  order.release(later.id);
  order.release(elsewhere.id);
  EXPECT_TRUE(order.empty());
}

TEST(WriteOrder, ReadModifyWritesOfOneBlockGoOneAtATime) {
  WriteOrder order;
  auto a = order.claim(0, 512, true);
  auto b = order.claim(0, 512, true);
  auto c = order.claim(512, 512, true);
  EXPECT_TRUE(a.granted);
  EXPECT_FALSE(b.granted);
  EXPECT_TRUE(c.granted) << "the next block is another block";
  EXPECT_EQ(order.release(b.id), std::vector<WriteOrder::Id>{}) << "a waiting claim may be withdrawn";
  EXPECT_TRUE(order.release(a.id).empty());
}

}  // namespace
}  // namespace bscache::policy
