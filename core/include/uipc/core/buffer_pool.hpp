// A bounded pool of fixed-size buffers: acquire fails, or waits, when it runs dry.
#pragma once

#include <atomic>
#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <span>
#include <utility>

#include "uipc/core/error.hpp"
#include "uipc/core/handler_store.hpp"

namespace uipc {

class buffer_pool;

/// One buffer lent by a buffer_pool; move-only. Destroying it (or reset())
/// gives the buffer back. The pool must outlive every buffer it lends.
class pooled_buffer {
 public:
  pooled_buffer() noexcept = default;
  // Inline: buffers move several times per datagram on the dispatcher's hot path.
  pooled_buffer(pooled_buffer&& other) noexcept
      : pool_(std::exchange(other.pool_, nullptr)),
        index_(other.index_),
        data_(std::exchange(other.data_, nullptr)),
        size_(std::exchange(other.size_, 0)) {}
  pooled_buffer& operator=(pooled_buffer&& other) noexcept {
    if (this != &other) {
      reset();
      pool_ = std::exchange(other.pool_, nullptr);
      index_ = other.index_;
      data_ = std::exchange(other.data_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }
  pooled_buffer(const pooled_buffer&) = delete;
  pooled_buffer& operator=(const pooled_buffer&) = delete;
  ~pooled_buffer() { reset(); }

  explicit operator bool() const noexcept { return pool_ != nullptr; }
  std::byte* data() const noexcept { return data_; }
  std::size_t size() const noexcept { return size_; }
  std::span<std::byte> span() const noexcept { return {data_, size_}; }

  /// Gives the buffer back to its pool now.
  void reset() noexcept {
    if (pool_ != nullptr) give_back();
  }

 private:
  friend class buffer_pool;
  pooled_buffer(buffer_pool* pool, std::uint32_t index, std::byte* data, std::size_t size) noexcept
      : pool_(pool), index_(index), data_(data), size_(size) {}
  void give_back() noexcept;

  buffer_pool* pool_ = nullptr;
  std::uint32_t index_ = 0;
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

/// A fixed number of buffers of one size, allocated once. try_acquire() never
/// blocks and fails when the pool is dry; async_acquire() waits for a buffer to
/// come back. Waiters are served in order, on their handler's executor.
///
/// Threading: every member may be called from any thread. Acquire and release
/// are lock-free unless someone waits.
///
/// When the executor's context is destroyed with waiters never completed,
/// they are destroyed with it (handler_store.hpp), as Asio's own operations
/// are; so the context must outlive the pool.
class buffer_pool final : handler_store {
 public:
  /// A pool of `count` buffers of `buffer_size` bytes each, allocated now (zero
  /// buffers is a pool that is always dry); waiters complete on `executor`
  /// unless their handler has an executor of its own. Not movable (lent buffers
  /// point to it), hence the unique_ptr. Errors, and nothing thrown:
  /// boost::system::errc::invalid_argument for a zero `buffer_size` or a size
  /// in all that overflows, or an empty executor; not_enough_memory when the
  /// allocation fails; the system's error when the context cannot start its
  /// reactor (no descriptor left).
  static result<std::unique_ptr<buffer_pool>> create(boost::asio::any_io_executor executor,
                                                     std::size_t buffer_size, std::uint32_t count);
  ~buffer_pool();
  buffer_pool(const buffer_pool&) = delete;
  buffer_pool& operator=(const buffer_pool&) = delete;

  /// A free buffer, or an empty pooled_buffer when none is free.
  pooled_buffer try_acquire() noexcept;

  /// A buffer, or errc::pool_exhausted when none is free.
  result<pooled_buffer> acquire() noexcept;

  /// Fills `out` from its front with free buffers, as many as there are, and
  /// returns how many: one atomic operation on the free list for the lot, where
  /// try_acquire() costs one each (a receive batch takes dozens at a time).
  /// The elements of `out` must be empty. Fails (returns 0) only when dry.
  std::size_t try_acquire(std::span<pooled_buffer> buffers) noexcept;

  /// Gives back every buffer of `buffers` that this pool lent, at once (one
  /// atomic operation on the free list); they are left empty. Buffers of
  /// another pool go back to it one by one; empty ones are skipped.
  void release(std::span<pooled_buffer> buffers) noexcept;

  /// Completes with a buffer as soon as one is free: at once, or when one comes
  /// back. Signature void(error_code, pooled_buffer); cancel() completes every
  /// waiter with boost::asio::error::operation_aborted.
  template <class Token>
  auto async_acquire(Token&& token) {
    return boost::asio::async_initiate<Token, void(error_code, pooled_buffer)>(
        [this](auto handler) { start_wait(handler_type(std::move(handler))); }, token);
  }

  /// Aborts every pending async_acquire.
  void cancel();

  std::size_t buffer_size() const noexcept { return buffer_size_; }
  std::uint32_t capacity() const noexcept { return count_; }
  /// Buffers lent out right now.
  std::uint32_t in_use() const noexcept { return in_use_.load(std::memory_order_relaxed); }
  std::uint32_t available() const noexcept { return count_ - in_use(); }
  /// async_acquire calls waiting right now.
  std::size_t waiting() const noexcept { return waiting_.load(std::memory_order_relaxed); }

 private:
  friend class pooled_buffer;
  using handler_type = boost::asio::any_completion_handler<void(error_code, pooled_buffer)>;

  static constexpr std::uint32_t empty_ = UINT32_MAX;

  buffer_pool(boost::asio::any_io_executor executor, std::size_t buffer_size, std::uint32_t count,
              std::unique_ptr<std::byte[]> storage,
              std::unique_ptr<std::atomic<std::uint32_t>[]> next);

  std::uint32_t pop() noexcept;
  /// Takes up to `want` buffers off the free list in one step; their indices go to `out`.
  std::uint32_t pop_many(std::uint32_t want, std::uint32_t* out) noexcept;
  /// Puts the chain first..last (linked through next_) on the free list in one step.
  void push_chain(std::uint32_t first, std::uint32_t last) noexcept;
  void release(std::uint32_t index) noexcept;
  void serve_waiters();
  /// A pooled_buffer for `index`, which the caller took off the free list and counted in in_use_.
  pooled_buffer make(std::uint32_t index) noexcept;
  pooled_buffer lend(std::uint32_t index) noexcept;
  void start_wait(handler_type handler);
  void complete(handler_type handler, error_code ec, pooled_buffer buffer);

  boost::asio::any_io_executor executor_;
  std::size_t buffer_size_;
  std::uint32_t count_;
  std::unique_ptr<std::byte[]> storage_;
  std::unique_ptr<std::atomic<std::uint32_t>[]> next_;
  std::atomic<std::uint64_t> head_;  // (tag << 32) | index of the first free buffer
  std::atomic<std::uint32_t> in_use_{0};
  std::atomic<std::size_t> waiting_{0};
  std::mutex waiters_mutex_;
  std::deque<handler_type> waiters_;
  handler_registration registration_;  // last: see handler_registration

  void drop_handlers() noexcept override;
};

}  // namespace uipc
