// Per-request pools (see pool.hpp): size-class free lists over bump-carved
// 64 KiB chunks, large blocks in chunk runs of their own, all chunks recycled
// through the host's pool_cache.
#include "uipc/plugin/pool.hpp"

#include <algorithm>
#include <cstring>
#include <new>
#include <utility>

namespace uipc::plugin {

namespace detail {

struct chunk {
  chunk* prev;
  chunk* next;
  std::size_t units;  // chunk_size each
  std::size_t reserved;
};
static_assert(sizeof(chunk) % 16 == 0);

static_assert(sizeof(block_header) == 16);

}  // namespace detail

namespace {

using detail::block_header;
using detail::chunk;

constexpr std::uintptr_t freed_bit = 1;
constexpr std::uintptr_t large_bit = 2;
constexpr std::size_t small_max = 16 << 10;
constexpr std::align_val_t chunk_alignment{64};

// Size classes: 16..1024 in steps of 16, then 2..16 KiB in steps of 1 KiB.
constexpr std::size_t class_capacity(std::size_t size) noexcept {
  if (size <= 1024) return size <= 16 ? 16 : (size + 15) & ~std::size_t{15};
  return (size + 1023) & ~std::size_t{1023};
}
constexpr std::size_t class_index(std::size_t capacity) noexcept {
  return capacity <= 1024 ? capacity / 16 - 1 : 64 + capacity / 1024 - 2;
}

block_header* header_of(void* block) noexcept { return static_cast<block_header*>(block) - 1; }
block_header*& next_free(block_header* h) noexcept {
  return *reinterpret_cast<block_header**>(h + 1);
}

}  // namespace

// -- pool_cache -----------------------------------------------------------------

pool_cache::~pool_cache() {
  for (auto& list : free_)
    for (chunk* c : list) ::operator delete(c, chunk_alignment);
}

std::size_t pool_cache::bytes_cached() const {
  std::lock_guard lock(mutex_);
  return cached_;
}

std::size_t pool_cache::bytes_held() const {
  std::lock_guard lock(mutex_);
  return held_;
}

chunk* pool_cache::take(std::size_t units) {
  const std::size_t bytes = units * chunk_size;
  {
    std::lock_guard lock(mutex_);
    if (units <= cached_kinds && !free_[units - 1].empty()) {
      chunk* c = free_[units - 1].back();
      free_[units - 1].pop_back();
      cached_ -= bytes;
      return c;
    }
  }
  void* memory = ::operator new(bytes, chunk_alignment, std::nothrow);
  if (!memory) return nullptr;
  auto* c = static_cast<chunk*>(memory);
  c->units = units;
  std::lock_guard lock(mutex_);
  held_ += bytes;
  return c;
}

void pool_cache::give(chunk* list) {
  std::vector<chunk*> to_system;
  {
    std::lock_guard lock(mutex_);
    while (list) {
      chunk* c = list;
      list = c->next;
      const std::size_t bytes = c->units * chunk_size;
      if (c->units <= cached_kinds && cached_ + bytes <= max_cached_) {
        try {
          free_[c->units - 1].push_back(c);
          cached_ += bytes;
          continue;
        } catch (const std::bad_alloc&) {
        }
      }
      held_ -= bytes;
      to_system.push_back(c);  // reserve-free: small vector, rare
    }
  }
  for (chunk* c : to_system) ::operator delete(c, chunk_alignment);
}

// -- pool -------------------------------------------------------------------------

pool::~pool() {
  release();
  trim();
}

void pool::trim() noexcept {
  if (!kept_) return;
  kept_->next = nullptr;
  cache_.give(std::exchange(kept_, nullptr));
  reserved_ = 0;
}

bool pool::charge(std::size_t bytes) noexcept {
  pool& r = root();
  if (r.limit_ && r.live_ + bytes > r.limit_) return false;
  r.live_ += bytes;
  if (parent_) in_use_ += bytes;
  return true;
}

void pool::uncharge(std::size_t bytes) noexcept {
  root().live_ -= bytes;
  if (parent_) in_use_ -= bytes;
}

void pool::refund(std::size_t bytes) noexcept {
  pool& r = root();
  r.peak_ = std::max(r.peak_, r.live_);
  r.live_ -= bytes;
  if (parent_) in_use_ -= bytes;
}

std::size_t pool::subtree_use() const noexcept {
  std::size_t n = 0;
  for (const pool* child : children_) n += child->in_use_ + child->subtree_use();
  return n;
}

std::size_t pool::bytes_in_use() const noexcept {
  return parent_ ? in_use_ : live_ - subtree_use();
}

std::size_t pool::peak() const noexcept {
  const pool& r = root();
  return std::max(r.peak_, r.live_);
}

int pool::carve(std::size_t capacity, void** out) noexcept {
  const std::size_t need = sizeof(block_header) + capacity;
  // Charged before a new chunk is begun: a block the limit refuses leaves the
  // pool as it was, the room left in its chunk included (where the last block
  // carved grows in place).
  if (!charge(capacity)) return UIPC_PLUGIN_E_MEMORY_LIMIT;
  if (static_cast<std::size_t>(end_ - top_) < need) {
    chunk* c = std::exchange(kept_, nullptr);  // counted in reserved_ already
    if (!c) {
      c = cache_.take(1);
      if (!c) {
        uncharge(capacity);
        return UIPC_PLUGIN_E_NO_MEMORY;
      }
      reserved_ += pool_cache::chunk_size;
    }
    c->prev = nullptr;
    c->next = chunks_;
    chunks_ = c;
    top_ = reinterpret_cast<char*>(c + 1);
    end_ = reinterpret_cast<char*>(c) + pool_cache::chunk_size;
  }
  auto* h = reinterpret_cast<block_header*>(top_);
  h->capacity = capacity;
  h->tag = reinterpret_cast<std::uintptr_t>(this);
  top_ += need;
  *out = h + 1;
  return UIPC_PLUGIN_OK;
}

int pool::allocate_large(std::size_t size, void** out) noexcept {
  const std::size_t overhead = sizeof(chunk) + sizeof(block_header);
  if (size > (std::size_t{1} << 48)) return UIPC_PLUGIN_E_NO_MEMORY;
  const std::size_t units = (size + overhead + pool_cache::chunk_size - 1) / pool_cache::chunk_size;
  const std::size_t capacity = units * pool_cache::chunk_size - overhead;
  if (!charge(capacity)) return UIPC_PLUGIN_E_MEMORY_LIMIT;
  chunk* c = cache_.take(units);
  if (!c) {
    uncharge(capacity);  // never live: no peak to note
    return UIPC_PLUGIN_E_NO_MEMORY;
  }
  c->prev = nullptr;
  c->next = large_;
  if (large_) large_->prev = c;
  large_ = c;
  reserved_ += units * pool_cache::chunk_size;
  auto* h = reinterpret_cast<block_header*>(c + 1);
  h->capacity = capacity;
  h->tag = reinterpret_cast<std::uintptr_t>(this) | large_bit;
  *out = h + 1;
  return UIPC_PLUGIN_OK;
}

int pool::allocate_slow(std::size_t size, void** out) noexcept {
  if (!out) return UIPC_PLUGIN_E_INVALID_ARGUMENT;
  if (size > small_max) return allocate_large(size, out);
  const std::size_t capacity = class_capacity(size);
  block_header*& list = free_lists_[class_index(capacity)];
  if (block_header* h = list) {
    if (!charge(capacity)) return UIPC_PLUGIN_E_MEMORY_LIMIT;
    list = next_free(h);
    h->tag = reinterpret_cast<std::uintptr_t>(this);
    *out = h + 1;
    return UIPC_PLUGIN_OK;
  }
  return carve(capacity, out);
}

int pool::check(void* block, block_header*& header) noexcept {
  if (!block) return UIPC_PLUGIN_E_INVALID_ARGUMENT;
  header = header_of(block);
  const std::uintptr_t tag = header->tag;
  if ((tag & ~(freed_bit | large_bit)) != reinterpret_cast<std::uintptr_t>(this))
    return UIPC_PLUGIN_E_WRONG_CONTEXT;
  if (tag & freed_bit) return UIPC_PLUGIN_E_DOUBLE_FREE;
  return UIPC_PLUGIN_OK;
}

int pool::free_slow(void* block) noexcept {
  block_header* h;
  if (int status = check(block, h); status != UIPC_PLUGIN_OK) return status;
  refund(h->capacity);
  if (h->tag & large_bit) {
    auto* c = reinterpret_cast<chunk*>(h) - 1;
    if (c->prev)
      c->prev->next = c->next;
    else
      large_ = c->next;
    if (c->next) c->next->prev = c->prev;
    reserved_ -= c->units * pool_cache::chunk_size;
    h->tag |= freed_bit;
    c->next = nullptr;
    cache_.give(c);
    return UIPC_PLUGIN_OK;
  }
  h->tag |= freed_bit;
  if (top_ == reinterpret_cast<char*>(h + 1) + h->capacity) {
    top_ = reinterpret_cast<char*>(h);  // the last block carved: carve it again
    return UIPC_PLUGIN_OK;
  }
  block_header*& list = free_lists_[class_index(h->capacity)];
  next_free(h) = list;
  list = h;
  return UIPC_PLUGIN_OK;
}

int pool::reallocate(void* block, std::size_t size, void** out) noexcept {
  if (!out) return UIPC_PLUGIN_E_INVALID_ARGUMENT;
  if (!block) return allocate(size, out);
  block_header* h;
  if (int status = check(block, h); status != UIPC_PLUGIN_OK) return status;
  if (size <= h->capacity) {
    *out = block;
    return UIPC_PLUGIN_OK;
  }
  // The last block carved grows in place while its chunk has room.
  if (size <= small_max && !(h->tag & large_bit) &&
      top_ == reinterpret_cast<char*>(h + 1) + h->capacity) {
    const std::size_t capacity = class_capacity(size);
    const std::size_t more = capacity - h->capacity;
    if (static_cast<std::size_t>(end_ - top_) >= more) {
      if (!charge(more)) return UIPC_PLUGIN_E_MEMORY_LIMIT;
      h->capacity = capacity;
      top_ += more;
      *out = block;
      return UIPC_PLUGIN_OK;
    }
  }
  void* moved = nullptr;
  if (int status = allocate(size, &moved); status != UIPC_PLUGIN_OK)
    return status;  // the old block stands
  std::memcpy(moved, block, h->capacity);
  (void)free_slow(block);
  *out = moved;
  return UIPC_PLUGIN_OK;
}

int pool::create_sub(pool** out) noexcept {
  if (!out) return UIPC_PLUGIN_E_INVALID_ARGUMENT;
  auto* sub = new (std::nothrow) pool(cache_, 0);
  if (!sub) return UIPC_PLUGIN_E_NO_MEMORY;
  try {
    children_.push_back(sub);
  } catch (const std::bad_alloc&) {
    delete sub;
    return UIPC_PLUGIN_E_NO_MEMORY;
  }
  sub->parent_ = this;
  sub->inline_room_ = 0;  // a sub-pool charges the root: always the slow path
  sub->user_ = user_;
  *out = sub;
  return UIPC_PLUGIN_OK;
}

int pool::destroy_sub(pool* sub) noexcept {
  auto it = std::find(children_.begin(), children_.end(), sub);
  if (!sub || it == children_.end()) return UIPC_PLUGIN_E_INVALID_ARGUMENT;
  children_.erase(it);
  delete sub;  // releases it
  return UIPC_PLUGIN_OK;
}

int pool::add_cleanup(void (*fn)(void*), void* data) noexcept {
  if (!fn) return UIPC_PLUGIN_E_INVALID_ARGUMENT;
  try {
    cleanups_.emplace_back(fn, data);
  } catch (const std::bad_alloc&) {
    return UIPC_PLUGIN_E_NO_MEMORY;
  }
  return UIPC_PLUGIN_OK;
}

void pool::release() noexcept {
  // Sub-pools first, newest first: their cleanups may still use this pool's memory.
  while (!children_.empty()) {
    pool* child = children_.back();
    children_.pop_back();
    delete child;
  }
  // Cleanups newest first; one may register another, which runs too.
  while (!cleanups_.empty()) {
    auto [fn, data] = cleanups_.back();
    cleanups_.pop_back();
    fn(data);
  }
  // One small chunk stays for the next request (as an APR pool keeps its
  // first block); the rest go back in one list: one turn of the cache's mutex.
  if (chunks_ && !kept_) {
    kept_ = chunks_;
    chunks_ = chunks_->next;
  }
  if (chunks_) {
    chunk* tail = chunks_;
    while (tail->next) tail = tail->next;
    tail->next = large_;
    cache_.give(chunks_);
  } else if (large_) {
    cache_.give(large_);
  }
  chunks_ = large_ = nullptr;
  if (parent_) {
    root().live_ -= in_use_;  // the sub-pools released above took theirs already
  } else {
    live_ = 0;
    peak_ = 0;
  }
  in_use_ = 0;
  reserved_ = kept_ ? pool_cache::chunk_size : 0;
  top_ = end_ = nullptr;
  std::fill(std::begin(free_lists_), std::end(free_lists_), nullptr);
}

}  // namespace uipc::plugin
