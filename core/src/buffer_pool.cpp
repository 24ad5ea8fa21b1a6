// buffer_pool: a lock-free free list of indices into one slab, plus a waiter queue.
#include "uipc/core/buffer_pool.hpp"

#include <algorithm>
#include <array>
#include <boost/asio/append.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/execution/bad_executor.hpp>
#include <boost/asio/execution/context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/query.hpp>
#include <boost/system/system_error.hpp>
#include <cassert>
#include <limits>
#include <new>
#include <optional>

namespace uipc {

namespace asio = boost::asio;

void pooled_buffer::give_back() noexcept {
  std::exchange(pool_, nullptr)->release(index_);
  data_ = nullptr;
  size_ = 0;
}

namespace {
constexpr std::size_t slab_alignment = 64;

std::size_t round_up(std::size_t n) {
  return (n + slab_alignment - 1) / slab_alignment * slab_alignment;
}

// The slab's size: each buffer rounded up to the alignment, plus room to align
// the start; nullopt when that does not fit in a size_t.
std::optional<std::size_t> slab_bytes(std::size_t buffer_size, std::uint32_t count) noexcept {
  constexpr std::size_t max = std::numeric_limits<std::size_t>::max();
  if (buffer_size > max - slab_alignment) return std::nullopt;
  const std::size_t each = round_up(buffer_size);
  if (count != 0 && each > (max - slab_alignment) / count) return std::nullopt;
  return each * count + slab_alignment;
}
}  // namespace

result<std::unique_ptr<buffer_pool>> buffer_pool::create(asio::any_io_executor executor,
                                                         std::size_t buffer_size,
                                                         std::uint32_t count) {
  const auto bytes = slab_bytes(buffer_size, count);
  if (buffer_size == 0 || !bytes) return make_error_code(boost::system::errc::invalid_argument);
  // Everything that can fail happens here, before the pool exists: a half-built
  // pool is never seen, and nothing is thrown past create().
  try {
    // NOLINTNEXTLINE(cppcoreguidelines-owning-memory): the unique_ptr owns it
    std::unique_ptr<std::byte[]> storage(new std::byte[*bytes]);
    // NOLINTNEXTLINE(cppcoreguidelines-owning-memory): the unique_ptr owns it
    std::unique_ptr<std::atomic<std::uint32_t>[]> next(new std::atomic<std::uint32_t>[count]);
    // NOLINTNEXTLINE(cppcoreguidelines-owning-memory): the constructor is private
    return std::unique_ptr<buffer_pool>(new buffer_pool(std::move(executor), buffer_size, count,
                                                        std::move(storage), std::move(next)));
  } catch (const std::bad_alloc&) {
    return make_error_code(boost::system::errc::not_enough_memory);
  } catch (const boost::system::system_error& e) {  // the context's reactor (handler_store.hpp)
    return e.code();
  } catch (const asio::execution::bad_executor&) {
    return make_error_code(boost::system::errc::invalid_argument);
  }
}

buffer_pool::buffer_pool(asio::any_io_executor executor, std::size_t buffer_size,
                         std::uint32_t count, std::unique_ptr<std::byte[]> storage,
                         std::unique_ptr<std::atomic<std::uint32_t>[]> next)
    : executor_(std::move(executor)),
      buffer_size_(buffer_size),
      count_(count),
      storage_(std::move(storage)),
      next_(std::move(next)),
      head_(count == 0 ? empty_ : 0),
      registration_(asio::query(executor_, asio::execution::context), *this) {
  for (std::uint32_t i = 0; i < count; ++i) next_[i].store(i + 1 == count ? empty_ : i + 1);
}

buffer_pool::~buffer_pool() {
  cancel();
  assert(in_use() == 0 && "a pooled_buffer outlived its pool");
}

std::uint32_t buffer_pool::pop() noexcept {
  std::uint64_t head = head_.load();
  for (;;) {
    const auto index = static_cast<std::uint32_t>(head);
    if (index == empty_) return empty_;
    // A stale read of next_[index] is harmless: the tag makes the CAS fail if
    // the buffer was popped and pushed again meanwhile.
    const std::uint64_t next =
        ((head >> 32) + 1) << 32 | next_[index].load(std::memory_order_relaxed);
    if (head_.compare_exchange_weak(head, next)) return index;
  }
}

std::uint32_t buffer_pool::pop_many(std::uint32_t want, std::uint32_t* out) noexcept {
  std::uint64_t head = head_.load();
  for (;;) {
    // The walk may read a list that changes under it, but every next_ entry
    // holds a valid index or empty_, and the walk is bounded by `want`; if the
    // list changed, the tag makes the exchange fail and we walk again.
    std::uint32_t taken = 0;
    std::uint32_t index = static_cast<std::uint32_t>(head);
    while (taken < want && index != empty_) {
      out[taken++] = index;
      index = next_[index].load(std::memory_order_relaxed);
    }
    if (taken == 0) return 0;
    const std::uint64_t next = ((head >> 32) + 1) << 32 | index;
    if (head_.compare_exchange_weak(head, next)) return taken;
  }
}

void buffer_pool::push_chain(std::uint32_t first, std::uint32_t last) noexcept {
  std::uint64_t head = head_.load();
  for (;;) {
    next_[last].store(static_cast<std::uint32_t>(head), std::memory_order_relaxed);
    const std::uint64_t next = ((head >> 32) + 1) << 32 | first;
    if (head_.compare_exchange_weak(head, next)) return;
  }
}

pooled_buffer buffer_pool::make(std::uint32_t index) noexcept {
  std::byte* base = storage_.get();
  base +=
      (slab_alignment - reinterpret_cast<std::uintptr_t>(base) % slab_alignment) % slab_alignment;
  return {this, index, base + round_up(buffer_size_) * index, buffer_size_};
}

pooled_buffer buffer_pool::lend(std::uint32_t index) noexcept {
  in_use_.fetch_add(1, std::memory_order_relaxed);
  return make(index);
}

pooled_buffer buffer_pool::try_acquire() noexcept {
  const std::uint32_t index = pop();
  return index == empty_ ? pooled_buffer{} : lend(index);
}

result<pooled_buffer> buffer_pool::acquire() noexcept {
  if (auto buffer = try_acquire()) return buffer;
  return make_error_code(errc::pool_exhausted);
}

std::size_t buffer_pool::try_acquire(std::span<pooled_buffer> buffers) noexcept {
  std::size_t done = 0;
  std::array<std::uint32_t, 64> indices;  // taken in steps of 64: no allocation
  while (done < buffers.size()) {
    const auto want = static_cast<std::uint32_t>(std::min(buffers.size() - done, indices.size()));
    const std::uint32_t got = pop_many(want, indices.data());
    if (got == 0) break;
    in_use_.fetch_add(got, std::memory_order_relaxed);
    for (std::uint32_t i = 0; i < got; ++i) {
      assert(!buffers[done + i] && "try_acquire: the output buffers must be empty");
      buffers[done + i] = make(indices[i]);
    }
    done += got;
    if (got < want) break;
  }
  return done;
}

void buffer_pool::release(std::span<pooled_buffer> buffers) noexcept {
  std::uint32_t first = empty_;
  std::uint32_t last = empty_;
  std::uint32_t count = 0;
  for (auto& b : buffers) {
    if (b.pool_ == nullptr) continue;
    if (b.pool_ != this) {
      b.reset();
      continue;
    }
    const std::uint32_t index = b.index_;
    b.pool_ = nullptr;
    b.data_ = nullptr;
    b.size_ = 0;
    // Linked in order: the chain's last element is the one whose next_ gets the old head.
    if (last != empty_) next_[last].store(index, std::memory_order_relaxed);
    if (first == empty_) first = index;
    last = index;
    ++count;
  }
  if (count == 0) return;
  in_use_.fetch_sub(count, std::memory_order_relaxed);
  push_chain(first, last);
  if (waiting_.load() != 0) serve_waiters();
}

void buffer_pool::release(std::uint32_t index) noexcept {
  in_use_.fetch_sub(1, std::memory_order_relaxed);
  push_chain(index, index);
  // Pairs with start_wait: it raises waiting_ before it tries pop(), we push
  // before we read waiting_, so one of the two sees the other.
  if (waiting_.load() != 0) serve_waiters();
}

void buffer_pool::serve_waiters() {
  std::unique_lock lock(waiters_mutex_);
  while (!waiters_.empty()) {
    const std::uint32_t free_index = pop();
    if (free_index == empty_) break;
    handler_type handler = std::move(waiters_.front());
    waiters_.pop_front();
    waiting_.fetch_sub(1);
    complete(std::move(handler), {}, lend(free_index));
  }
}

void buffer_pool::start_wait(handler_type handler) {
  std::unique_lock lock(waiters_mutex_);
  waiting_.fetch_add(1);
  if (waiters_.empty()) {
    const std::uint32_t index = pop();
    if (index != empty_) {
      waiting_.fetch_sub(1);
      lock.unlock();
      complete(std::move(handler), {}, lend(index));
      return;
    }
  }
  waiters_.push_back(std::move(handler));
}

void buffer_pool::cancel() {
  std::deque<handler_type> aborted;
  {
    std::lock_guard lock(waiters_mutex_);
    aborted.swap(waiters_);
    waiting_.fetch_sub(aborted.size());
  }
  for (auto& handler : aborted) complete(std::move(handler), asio::error::operation_aborted, {});
}

void buffer_pool::drop_handlers() noexcept {
  try {
    std::deque<handler_type> dropped;  // may allocate: libstdc++'s deque does
    {
      std::lock_guard lock(waiters_mutex_);
      dropped.swap(waiters_);
      waiting_.fetch_sub(dropped.size());
    }
  } catch (const std::bad_alloc&) {  // NOLINT(bugprone-empty-catch)
    // The waiters stay (a leak at worst).
  }  // the waiters went: nothing of the pool is touched after them
}

void buffer_pool::complete(handler_type handler, error_code ec, pooled_buffer buffer) {
  // Never inline: the waiter may be inside release() of another buffer. post()
  // runs it on the handler's own executor when it has one.
  asio::post(executor_, asio::append(std::move(handler), ec, std::move(buffer)));
}

}  // namespace uipc
