// The daemon's private bookkeeping of the segment's scratch area: first fit with
// coalescing. Kept out of shared memory so no client can corrupt it.
#pragma once

#include <cstdint>
#include <map>
#include <optional>

namespace uipc::handles::detail {

class scratch_allocator {
 public:
  static constexpr std::uint64_t alignment = 16;

  explicit scratch_allocator(std::uint64_t size) : size_(size & ~(alignment - 1)) {
    if (size_ > 0) free_.emplace(0, size_);
  }

  /// An offset of a block of at least `bytes` (rounded up), or nothing.
  std::optional<std::uint64_t> allocate(std::uint64_t bytes) {
    if (bytes == 0 || bytes > size_) return std::nullopt;
    const std::uint64_t need = (bytes + alignment - 1) & ~(alignment - 1);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->second < need) continue;
      const std::uint64_t offset = it->first;
      const std::uint64_t left = it->second - need;
      free_.erase(it);
      if (left > 0) free_.emplace(offset + need, left);
      used_.emplace(offset, need);
      in_use_ += need;
      return offset;
    }
    return std::nullopt;
  }

  /// The size of the block at `offset`, or nothing if no block starts there.
  std::optional<std::uint64_t> block_size(std::uint64_t offset) const {
    auto it = used_.find(offset);
    if (it == used_.end()) return std::nullopt;
    return it->second;
  }

  /// Frees the block at `offset`; false if no block starts there.
  bool free(std::uint64_t offset) {
    auto it = used_.find(offset);
    if (it == used_.end()) return false;
    std::uint64_t start = it->first;
    std::uint64_t length = it->second;
    in_use_ -= length;
    used_.erase(it);
    auto next = free_.lower_bound(start);
    if (next != free_.end() && next->first == start + length) {
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

  std::uint64_t size() const noexcept { return size_; }
  std::uint64_t in_use() const noexcept { return in_use_; }
  std::size_t blocks() const noexcept { return used_.size(); }
  /// Free ranges (one when everything is free: proof that coalescing worked).
  std::size_t free_ranges() const noexcept { return free_.size(); }

 private:
  std::uint64_t size_;
  std::uint64_t in_use_ = 0;
  std::map<std::uint64_t, std::uint64_t> free_;
  std::map<std::uint64_t, std::uint64_t> used_;
};

}  // namespace uipc::handles::detail
