// First fit with coalescing (range_allocator.hpp).
#include "uipc/core/range_allocator.hpp"

#include <algorithm>
#include <iterator>

namespace uipc {

range_allocator::range_allocator(std::uint64_t size, std::uint64_t alignment)
    : alignment_(alignment), size_(size & ~(alignment - 1)) {
  if (size_ > 0) free_.emplace(size_, 0);
}

std::optional<std::uint64_t> range_allocator::allocate(std::uint64_t length) {
  if (length > size_) return std::nullopt;
  const std::uint64_t need =
      std::max<std::uint64_t>(alignment_, (length + alignment_ - 1) & ~(alignment_ - 1));
  // In order of their ends is in order of their starts: the ranges are disjoint.
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    const auto [end, start] = *it;
    if (end - start < need) continue;
    if (end - start == need) {
      free_.erase(it);
    } else {
      it->second = start + need;  // the front is taken: the key stays
    }
    taken_.emplace(start, need);
    in_use_ += need;
    return start;
  }
  return std::nullopt;
}

std::optional<std::uint64_t> range_allocator::block_size(std::uint64_t offset) const {
  const auto it = taken_.find(offset);
  if (it == taken_.end()) return std::nullopt;
  return it->second;
}

bool range_allocator::free(std::uint64_t offset) {
  const auto t = taken_.find(offset);
  if (t == taken_.end()) return false;
  const std::uint64_t start = offset;
  const std::uint64_t end = offset + t->second;
  in_use_ -= t->second;
  taken_.erase(t);
  // The range after the block (the first ending beyond it) and the one before
  // (ending where the block starts).
  const auto next = free_.upper_bound(end);
  const bool joins_next = next != free_.end() && next->second == end;
  const auto prev = free_.find(start);
  if (joins_next) {
    if (prev != free_.end()) {
      next->second = prev->second;  // all three become one
      free_.erase(prev);
    } else {
      next->second = start;
    }
  } else if (prev != free_.end()) {
    auto node = free_.extract(prev);  // the range grows at its end: a new key, the same node
    node.key() = end;
    free_.insert(next, std::move(node));
  } else {
    free_.emplace_hint(next, end, start);
  }
  return true;
}

}  // namespace uipc
