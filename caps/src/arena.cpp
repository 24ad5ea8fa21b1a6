#include "arena.hpp"

#include <algorithm>
#include <iterator>

#include "channel.hpp"

namespace uipc::caps::detail {

arena_allocator::arena_allocator(std::size_t size)
    : size_(size / payload_alignment * payload_alignment) {
  if (size_ > 0) free_.emplace(0, size_);
}

std::optional<std::uint64_t> arena_allocator::allocate(std::size_t length) {
  if (length > size_) return std::nullopt;
  const std::size_t need = std::max<std::size_t>(
      payload_alignment, (length + payload_alignment - 1) / payload_alignment * payload_alignment);
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second < need) continue;
    const std::uint64_t offset = it->first;
    const std::size_t rest = it->second - need;
    free_.erase(it);
    if (rest > 0) free_.emplace(offset + need, rest);
    taken_.emplace(offset, need);
    in_use_ += need;
    return offset;
  }
  return std::nullopt;
}

bool arena_allocator::free(std::uint64_t offset) {
  const auto t = taken_.find(offset);
  if (t == taken_.end()) return false;
  std::uint64_t start = offset;
  std::size_t length = t->second;
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

}  // namespace uipc::caps::detail
