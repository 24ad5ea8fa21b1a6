// Per-request memory pools: allocate, reallocate and free within a request,
// everything released at its end, chunks reused across requests.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

#include "uipc/plugin/abi.h"

namespace uipc::plugin {

namespace detail {
struct chunk;
/// What precedes every block.
struct block_header {
  std::size_t capacity;  // usable bytes after the header
  std::uintptr_t tag;    // the owning pool, | 1 once freed, | 2 for a large block
};
}  // namespace detail

/// Chunks shared by the pools of a host: what a pool releases goes back here
/// (up to a bound; the rest to the system), so memory stays flat under load.
///
/// Threading: thread-safe. One mutex, taken when a pool needs a chunk or
/// gives its chunks back, never per allocation.
class pool_cache {
 public:
  /// `max_cached`: most bytes kept for reuse.
  explicit pool_cache(std::size_t max_cached = std::size_t{64} << 20) : max_cached_(max_cached) {}
  ~pool_cache();
  pool_cache(const pool_cache&) = delete;
  pool_cache& operator=(const pool_cache&) = delete;

  /// Bytes kept for reuse now.
  std::size_t bytes_cached() const;
  /// Bytes taken from the system and not given back (cached or in use).
  std::size_t bytes_held() const;

  /// The unit chunks come in; a large block takes a whole number of them.
  static constexpr std::size_t chunk_size = std::size_t{64} << 10;

 private:
  friend class pool;
  detail::chunk* take(std::size_t units);  // null when the system has no memory
  void give(detail::chunk* list);          // a list linked through chunk::next

  static constexpr std::size_t cached_kinds = 4;  // 1 to 4 units are cached
  mutable std::mutex mutex_;
  std::vector<detail::chunk*> free_[cached_kinds];
  std::size_t max_cached_;
  std::size_t cached_ = 0;
  std::size_t held_ = 0;
};

/// One request's memory (or a sub-pool of it).
///
/// Blocks are 16-byte aligned and carry a 16-byte header naming their pool,
/// so a block given back to another pool (UIPC_PLUGIN_E_WRONG_CONTEXT) or
/// twice (UIPC_PLUGIN_E_DOUBLE_FREE) is refused and nothing changes. A
/// pointer that no pool gave is undefined behaviour, as with free().
/// Small blocks (up to 16 KiB) are carved from 64 KiB chunks; a freed one is
/// reused by the next allocation of its size class, and the last one carved
/// grows and shrinks in place. Larger blocks take whole chunks of their own.
///
/// The limit counts the capacity of live blocks of the root pool and all its
/// sub-pools. release() runs sub-pools' releases (newest first), then the
/// pool's cleanups (newest first), then gives every chunk back to the cache.
///
/// Threading: one thread at a time (the host detects misuse through a context).
class pool {
 public:
  explicit pool(pool_cache& cache, std::size_t limit = 0) : cache_(cache) { set_limit(limit); }
  ~pool();
  pool(const pool&) = delete;
  pool& operator=(const pool&) = delete;

  /// A block of at least `size` bytes (0 gives a unique block). Errors:
  /// UIPC_PLUGIN_E_MEMORY_LIMIT, UIPC_PLUGIN_E_NO_MEMORY, INVALID_ARGUMENT;
  /// a refused allocation leaves the pool as it was.
  /// Inline for small blocks of a root pool within its limit and its chunk.
  [[gnu::always_inline]] int allocate(std::size_t size, void** out) noexcept {
    const std::size_t capacity = size <= 16 ? 16 : (size + 15) & ~std::size_t{15};
    if (size <= 1024 && out && live_ + capacity <= inline_room_) [[likely]] {
      detail::block_header*& list = free_lists_[capacity / 16 - 1];
      detail::block_header* h = list;
      if (h) {
        list = *reinterpret_cast<detail::block_header**>(h + 1);
      } else if (static_cast<std::size_t>(end_ - top_) >= sizeof(detail::block_header) + capacity) {
        h = reinterpret_cast<detail::block_header*>(top_);
        h->capacity = capacity;
        top_ += sizeof(detail::block_header) + capacity;
      } else {
        return allocate_slow(size, out);
      }
      h->tag = reinterpret_cast<std::uintptr_t>(this);
      live_ += capacity;  // a root pool's own use is live_ less its sub-pools'; the peak is noted
                          // at decreases
      *out = h + 1;
      return UIPC_PLUGIN_OK;
    }
    return allocate_slow(size, out);
  }
  /// Resizes `block` (null: allocate), in place when it can. On failure the
  /// old block stays valid and unchanged.
  int reallocate(void* block, std::size_t size, void** out) noexcept;
  /// Gives `block` back for reuse within this pool. Errors: WRONG_CONTEXT
  /// (another pool's block), DOUBLE_FREE, INVALID_ARGUMENT (null).
  /// Inline for a small block of a root pool.
  [[gnu::always_inline]] int free(void* block) noexcept {
    if (block && !parent_) [[likely]] {
      auto* h = static_cast<detail::block_header*>(block) - 1;
      const std::size_t capacity = h->capacity;
      // The tag is this pool exactly: not freed, not large, not another's.
      if (h->tag == reinterpret_cast<std::uintptr_t>(this) && capacity <= 1024) [[likely]] {
        if (live_ > peak_) peak_ = live_;
        live_ -= capacity;
        h->tag |= 1;
        if (static_cast<char*>(block) + capacity == top_) {
          top_ = reinterpret_cast<char*>(h);  // the block carved last: carve it again
        } else {
          detail::block_header*& list = free_lists_[capacity / 16 - 1];
          *reinterpret_cast<detail::block_header**>(h + 1) = list;
          list = h;
        }
        return UIPC_PLUGIN_OK;
      }
    }
    return free_slow(block);
  }

  /// A sub-pool, released with this one (or by destroy_sub).
  int create_sub(pool** out) noexcept;
  /// Releases and deletes a direct sub-pool. INVALID_ARGUMENT for another.
  int destroy_sub(pool* sub) noexcept;
  /// Runs `fn(data)` at release, newest first.
  int add_cleanup(void (*fn)(void*), void* data) noexcept;

  /// Releases everything; the pool is then empty and may serve again. It
  /// keeps one chunk for its next use (trim() gives that back too).
  void release() noexcept;
  /// Gives back the chunk release() kept.
  void trim() noexcept;

  void set_limit(std::size_t limit) noexcept {
    pool& r = root();
    r.limit_ = limit;
    r.inline_room_ = limit ? limit : ~std::size_t{0};
  }
  /// Capacity of this pool's live blocks (not its sub-pools').
  std::size_t bytes_in_use() const noexcept;
  /// Chunk bytes this pool holds (with the one it keeps between uses).
  std::size_t bytes_reserved() const noexcept { return reserved_; }
  /// The root's most live bytes (with its sub-pools) since its last release.
  std::size_t peak() const noexcept;

  pool* parent() const noexcept { return parent_; }
  void* user() const noexcept { return user_; }
  void set_user(void* user) noexcept { user_ = user; }

 private:
  static constexpr std::size_t small_classes = 64 + 15;  // 16..1024 by 16, then 2..16 KiB by 1 KiB
  pool& root() noexcept { return parent_ ? parent_->root() : *this; }
  const pool& root() const noexcept { return parent_ ? parent_->root() : *this; }
  std::size_t subtree_use() const noexcept;  // sub-pools' bytes_in_use, recursively
  int allocate_slow(std::size_t size, void** out) noexcept;
  int free_slow(void* block) noexcept;
  int carve(std::size_t capacity, void** out) noexcept;
  int allocate_large(std::size_t size, void** out) noexcept;
  bool charge(std::size_t bytes) noexcept;
  void uncharge(std::size_t bytes) noexcept;  // a charge undone: the block never was
  void refund(std::size_t bytes) noexcept;    // a live block freed: its peak noted
  int check(void* block, detail::block_header*& header) noexcept;

  pool_cache& cache_;
  pool* parent_ = nullptr;
  void* user_ = nullptr;
  std::size_t limit_ = 0;
  std::size_t inline_room_ =
      0;                    // a root: its limit (or all); a sub-pool: 0, so it takes the slow path
  std::size_t live_ = 0;    // root: live capacity of the whole tree
  std::size_t peak_ = 0;    // root: the most live_ seen at a decrease (peak() adds the present)
  std::size_t in_use_ = 0;  // a sub-pool's own live capacity (a root's is derived)
  std::size_t reserved_ = 0;
  detail::chunk* chunks_ = nullptr;  // small chunks; the first is being carved
  detail::chunk* large_ = nullptr;   // large blocks, one per chunk run
  detail::chunk* kept_ = nullptr;    // a small chunk kept by release() for the next use
  char* top_ = nullptr;              // where the next block is carved
  char* end_ = nullptr;
  detail::block_header* free_lists_[small_classes] = {};
  std::vector<pool*> children_;
  std::vector<std::pair<void (*)(void*), void*>> cleanups_;
};

}  // namespace uipc::plugin
