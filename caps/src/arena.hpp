// A first-fit allocator of one payload arena, kept in the writer's private
// memory: the peer sees only the offsets it is given, and nothing it writes
// can corrupt the allocator.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory_resource>
#include <optional>
#include <unordered_map>

namespace uipc::caps::detail {

class arena_allocator {
 public:
  explicit arena_allocator(std::size_t size);

  /// An offset of `length` bytes (at least one block), or nothing when no free
  /// run is large enough.
  std::optional<std::uint64_t> allocate(std::size_t length);
  /// Frees a block allocate() gave; false for an offset it did not give.
  bool free(std::uint64_t offset);

  std::size_t size() const noexcept { return size_; }
  std::size_t in_use() const noexcept { return in_use_; }

 private:
  std::size_t size_;
  std::size_t in_use_ = 0;
  // Nodes come from a pool of the allocator's own: no malloc per message once warm.
  std::pmr::unsynchronized_pool_resource pool_;
  std::pmr::map<std::uint64_t, std::size_t> free_{&pool_};  // offset -> length, coalesced
  std::pmr::unordered_map<std::uint64_t, std::size_t> taken_{&pool_};  // offset -> length
};

}  // namespace uipc::caps::detail
