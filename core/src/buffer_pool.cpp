// buffer_pool: a lock-free free list of indices into one slab, plus a waiter queue.
#include "uipc/core/buffer_pool.hpp"

#include <boost/asio/append.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/post.hpp>

#include <cassert>
#include <limits>
#include <stdexcept>

namespace uipc {

namespace asio = boost::asio;

pooled_buffer::pooled_buffer(pooled_buffer&& other) noexcept
    : pool_(std::exchange(other.pool_, nullptr)),
      index_(other.index_),
      data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)) {}

pooled_buffer& pooled_buffer::operator=(pooled_buffer&& other) noexcept {
  if (this != &other) {
    reset();
    pool_ = std::exchange(other.pool_, nullptr);
    index_ = other.index_;
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

void pooled_buffer::reset() noexcept {
  if (pool_ != nullptr) {
    std::exchange(pool_, nullptr)->release(index_);
    data_ = nullptr;
    size_ = 0;
  }
}

namespace {
constexpr std::size_t slab_alignment = 64;

std::size_t round_up(std::size_t n) { return (n + slab_alignment - 1) / slab_alignment * slab_alignment; }

// The slab's size; std::length_error (as std::vector would) when it overflows.
std::size_t slab_bytes(std::size_t buffer_size, std::uint32_t count) {
  const std::size_t limit = (std::numeric_limits<std::size_t>::max() - 2 * slab_alignment) / (count == 0 ? 1 : count);
  if (buffer_size > limit) throw std::length_error("buffer_pool: buffer_size * count overflows");
  return round_up(buffer_size) * count + slab_alignment;
}
}  // namespace

buffer_pool::buffer_pool(asio::any_io_executor executor, std::size_t buffer_size, std::uint32_t count)
    : executor_(std::move(executor)),
      buffer_size_(buffer_size),
      count_(count),
      storage_(new std::byte[slab_bytes(buffer_size, count)]),  // NOLINT(cppcoreguidelines-owning-memory): unique_ptr owns it
      next_(new std::atomic<std::uint32_t>[count]),
      head_(count == 0 ? empty_ : 0) {
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
    const std::uint64_t next = ((head >> 32) + 1) << 32 | next_[index].load(std::memory_order_relaxed);
    if (head_.compare_exchange_weak(head, next)) return index;
  }
}

void buffer_pool::push(std::uint32_t index) noexcept {
  std::uint64_t head = head_.load();
  for (;;) {
    next_[index].store(static_cast<std::uint32_t>(head), std::memory_order_relaxed);
    const std::uint64_t next = ((head >> 32) + 1) << 32 | index;
    if (head_.compare_exchange_weak(head, next)) return;
  }
}

pooled_buffer buffer_pool::lend(std::uint32_t index) noexcept {
  in_use_.fetch_add(1, std::memory_order_relaxed);
  std::byte* base = storage_.get();
  base += (slab_alignment - reinterpret_cast<std::uintptr_t>(base) % slab_alignment) % slab_alignment;
  return {this, index, base + round_up(buffer_size_) * index, buffer_size_};
}

pooled_buffer buffer_pool::try_acquire() noexcept {
  const std::uint32_t index = pop();
  return index == empty_ ? pooled_buffer{} : lend(index);
}

result<pooled_buffer> buffer_pool::acquire() noexcept {
  if (auto buffer = try_acquire()) return buffer;
  return make_error_code(errc::pool_exhausted);
}

void buffer_pool::release(std::uint32_t index) noexcept {
  in_use_.fetch_sub(1, std::memory_order_relaxed);
  push(index);
  // Pairs with start_wait: it raises waiting_ before it tries pop(), we push
  // before we read waiting_, so one of the two sees the other.
  if (waiting_.load() == 0) return;
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

void buffer_pool::complete(handler_type handler, error_code ec, pooled_buffer buffer) {
  // Never inline: the waiter may be inside release() of another buffer. post()
  // runs it on the handler's own executor when it has one.
  asio::post(executor_, asio::append(std::move(handler), ec, std::move(buffer)));
}

}  // namespace uipc
