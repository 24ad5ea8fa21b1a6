// First fit with coalescing (range_allocator.hpp).
#include "uipc/core/range_allocator.hpp"

#include <algorithm>
#include <iterator>

namespace uipc {

range_allocator::range_allocator(std::uint64_t size, std::uint64_t alignment)
    : alignment_(alignment), size_(size & ~(alignment - 1)) {
  if (size_ > 0) free_.emplace(0, size_);
}

std::optional<std::uint64_t> range_allocator::allocate(std::uint64_t length) {
  if (length > size_) return std::nullopt;
  const std::uint64_t need =
      std::max<std::uint64_t>(alignment_, (length + alignment_ - 1) & ~(alignment_ - 1));
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second < need) continue;
    const std::uint64_t offset = it->first;
    const std::uint64_t rest = it->second - need;
    free_.erase(it);
    if (rest > 0) free_.emplace(offset + need, rest);
    taken_.emplace(offset, need);
    in_use_ += need;
    return offset;
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
  std::uint64_t start = offset;
  std::uint64_t length = t->second;
  taken_.erase(t);
  in_use_ -= length;
  auto next = free_.lower_bound(start);
  if (next != free_.end() && start + length == next->first) {
    length += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == start) {
      start = prev->first;
      length += prev->second;
      free_.erase(prev);
    }
  }
  free_.emplace(start, length);
  return true;
}

}  // namespace uipc
