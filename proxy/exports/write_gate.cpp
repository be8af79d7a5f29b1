#include "proxy/exports/write_gate.hpp"

namespace bscache::proxy {

awaitable<WriteGate::Hold> WriteGate::enter(uint64_t offset, uint64_t length, bool exclusive) {
  const auto claim = order_.claim(offset, length, exclusive);
  Hold hold(*this, claim.id);  // withdrawn if this coroutine goes away while waiting
  if (!claim.granted) {
    auto granted = std::make_shared<LoopSignal>(io_);
    waiting_[claim.id] = granted;
    while (waiting_.contains(claim.id)) co_await granted->wait();
  }
  co_return hold;
}

void WriteGate::release(policy::WriteOrder::Id id) {
  waiting_.erase(id);
  for (const auto granted : order_.release(id)) {
    if (auto it = waiting_.find(granted); it != waiting_.end()) {
      it->second->notify();
      waiting_.erase(it);
    }
  }
}

}  // namespace bscache::proxy
