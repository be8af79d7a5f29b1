#include "policy/write_order.hpp"

namespace bscache::policy {

namespace {
bool conflict(const WriteOrder::Entry& a, const WriteOrder::Entry& b) {
  return (a.exclusive || b.exclusive) && a.offset < b.end && b.offset < a.end;
}
}  // namespace

bool WriteOrder::conflicts_with_earlier(std::list<Entry>::const_iterator it) const {
  for (auto earlier = entries_.begin(); earlier != it; ++earlier) {
    if (conflict(*earlier, *it)) return true;
  }
  return false;
}

WriteOrder::Entry WriteOrder::claim(uint64_t offset, uint64_t length, bool exclusive) {
  entries_.push_back({next_id_++, offset, offset + length, exclusive, false});
  auto it = std::prev(entries_.end());
  it->granted = !conflicts_with_earlier(it);
  return *it;
}

std::vector<WriteOrder::Id> WriteOrder::release(Id id) {
  std::vector<Id> granted;
  for (auto it = entries_.begin(); it != entries_.end(); ++it) {
    if (it->id == id) {
      entries_.erase(it);
      break;
    }
  }
  for (auto it = entries_.begin(); it != entries_.end(); ++it) {
    if (!it->granted && !conflicts_with_earlier(it)) {
      it->granted = true;
      granted.push_back(it->id);
    }
  }
  return granted;
}

}  // namespace bscache::policy
