// First fit with coalescing over the offsets of one region (a caps payload
// arena, the handle daemon's scratch area), kept in its owner's private
// memory: a peer that maps the region sees only the offsets it is given, and
// nothing it writes there can corrupt the books.
#pragma once

#include <boost/unordered/unordered_flat_map.hpp>
#include <cstdint>
#include <map>
#include <memory_resource>
#include <optional>

namespace uipc {

class range_allocator {
 public:
  /// A region of `size` bytes (rounded down to `alignment`, a power of two).
  range_allocator(std::uint64_t size, std::uint64_t alignment);
  range_allocator(const range_allocator&) = delete;
  range_allocator& operator=(const range_allocator&) = delete;

  /// The offset of a block of `length` bytes rounded up to the alignment (at
  /// least one unit), or nothing when no free range is large enough.
  std::optional<std::uint64_t> allocate(std::uint64_t length);
  /// The size of the block at `offset`, or nothing if no block starts there.
  std::optional<std::uint64_t> block_size(std::uint64_t offset) const;
  /// Frees the block at `offset`; false for an offset allocate() did not give
  /// (or gave and got back already).
  bool free(std::uint64_t offset);

  std::uint64_t size() const noexcept { return size_; }
  std::uint64_t in_use() const noexcept { return in_use_; }
  std::size_t blocks() const noexcept { return taken_.size(); }
  /// Free ranges (one when everything is free: proof that coalescing worked).
  std::size_t free_ranges() const noexcept { return free_.size(); }

 private:
  std::uint64_t alignment_;
  std::uint64_t size_;
  std::uint64_t in_use_ = 0;
  // Free ranges keyed by their end: a block taken from a range's front, or
  // given back just before a range, moves the range's start and leaves the
  // tree alone (the steady state of a channel: one block in use and given
  // back, no node made or unlinked). Nodes come from a pool of the
  // allocator's own: no malloc per block once warm.
  std::pmr::unsynchronized_pool_resource pool_;
  std::pmr::map<std::uint64_t, std::uint64_t> free_{&pool_};       // end -> start
  boost::unordered_flat_map<std::uint64_t, std::uint64_t> taken_;  // offset -> length
};

}  // namespace uipc
