// The service's shared state: what registration builds, the control line
// (service_control.cpp) and the receiver (service_receive.cpp) work on, and the
// answers (service.cpp) write through.
#pragma once

#include <fcntl.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <cerrno>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <span>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "server_channel.hpp"
#include "uipc/caps/service.hpp"
#include "uipc/core/handler_store.hpp"
#include "uipc/core/process.hpp"

namespace uipc::caps {

namespace detail {

inline error_code system_error() { return {errno, boost::system::system_category()}; }

inline unique_fd make_eventfd() { return unique_fd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)); }

inline unique_fd duplicate(int fd) { return unique_fd(::fcntl(fd, F_DUPFD_CLOEXEC, 0)); }

inline void clear_eventfd(int fd) {
  eventfd_t value;
  (void)::eventfd_read(fd, &value);  // EAGAIN: already clear
}

inline frame error_notice(error_code ec) {
  frame f;
  f.kind = frame_kind::notice;
  f.error = to_wire_error(ec);
  return f;
}

}  // namespace detail

using detail::server_channel;

struct service::impl final : std::enable_shared_from_this<impl>, handler_store {
  impl(boost::asio::io_context& c, service_options o)
      : ctx(c), options(std::move(o)), epoll_desc(c), registration(c, *this) {}
  impl(const impl&) = delete;
  impl& operator=(const impl&) = delete;
  ~impl() = default;

  boost::asio::io_context& ctx;
  service_options options;
  std::string name;
  std::string socket_path;
  unique_fd name_lock;
  point_info info;
  fork_guard fork;
  request_router router;
  std::unique_ptr<server> srv;
  unique_fd epoll;
  unique_fd control_bell;  // rung when control events wait in the queue
  boost::asio::posix::stream_descriptor epoll_desc;

  mutable std::mutex channels_mutex;
  std::unordered_map<client_id, std::shared_ptr<server_channel>> channels;
  /// Channels not yet destroyed, connected or not: admission counts these
  /// against max_clients, so clients that come and go while the application
  /// does not receive cannot pin descriptors without bound.
  std::shared_ptr<std::atomic<std::size_t>> channels_alive =
      std::make_shared<std::atomic<std::size_t>>(0);

  std::mutex queue_mutex;
  std::deque<event> queue;
  std::atomic<std::size_t> queued{0};  // queue.size(), written under queue_mutex: read without it

  // Receivers take turns: an atomic flag, taken and given back without a
  // system call or a lock of its own; a receiver that must wait for its turn
  // sleeps on a condition variable (not std::timed_mutex: its timed lock,
  // pthread_mutex_clocklock, is invisible to ThreadSanitizer).
  class turn {
   public:
    bool try_lock() noexcept { return !taken_.exchange(true, std::memory_order_acquire); }
    bool try_lock_until(clock::time_point deadline) {
      if (try_lock()) return true;
      std::unique_lock lock(mutex_);
      // Counted before the look: an unlock that misses the count is seen by
      // the look (both sequentially consistent: the look's exchange too), one
      // that sees it notifies.
      waiting_.fetch_add(1, std::memory_order_seq_cst);
      const auto take = [this] { return !taken_.exchange(true, std::memory_order_seq_cst); };
      bool taken = true;
      if (deadline == clock::time_point::max()) {
        freed_.wait(lock, take);  // a wait_until(max) would overflow converting clocks
      } else {
        taken = freed_.wait_until(lock, deadline, take);
      }
      waiting_.fetch_sub(1, std::memory_order_seq_cst);
      return taken;
    }
    void unlock() {
      taken_.store(false, std::memory_order_seq_cst);
      if (waiting_.load(std::memory_order_seq_cst) == 0) return;
      { std::lock_guard lock(mutex_); }  // a waiter between its look and its sleep is asleep now
      freed_.notify_one();
    }

   private:
    std::atomic<bool> taken_{false};
    std::atomic<std::uint32_t> waiting_{0};
    std::mutex mutex_;
    std::condition_variable freed_;
  };
  turn pump_mutex;
  std::vector<std::shared_ptr<server_channel>> hot;
  std::uint32_t sweeps_since_poll = 0;

  std::mutex async_mutex;
  std::deque<receive_handler> async_waiters;
  bool async_armed = false;

  std::mutex info_mutex;  // one publish_info() at a time

  std::atomic<bool> stopped{false};
  struct counters {
    std::atomic<std::uint64_t> clients_total{0}, requests{0}, replies{0}, disposals{0},
        withdrawals{0}, violations{0}, refusals{0}, doorbells{0};
  } counters;

  // ---- control line (loop threads) ----------------------------------------------

  error_code admit(const peer_identity& peer);
  void session_started(const std::shared_ptr<server_session>& session);
  result<std::shared_ptr<server_channel>> open_channel(
      const std::shared_ptr<server_session>& session);

  void session_ended(server_session& session);

  // One writer at a time: a client that connects while register_point() still
  // publishes would otherwise race it for the file written aside.
  error_code publish_info();

  // Queues events from a loop thread and wakes the receiver.
  void push_events(std::vector<event> events);
  // Removes the queued connected event of `ch` if it is the only event of
  // `ch` in the queue; whether it did.
  bool withdraw_unseen_arrival(const server_channel& ch);

  // A client that broke the channel protocol loses its connection.
  void violation(const std::shared_ptr<server_channel>& ch);
  std::shared_ptr<server_channel> find(client_id client) const;

  // ---- the receiver (pump lock held) ----------------------------------------------

  // Reads one channel into the queue. Returns how many events it gave.
  std::size_t drain(const std::shared_ptr<server_channel>& ch);
  void make_hot(const std::shared_ptr<server_channel>& ch);

  // Stops watching a channel; false (and it stays watched) if it has work.
  bool cool(server_channel& ch);

  // Reads the watched channels; every 64th sweep (or always, with
  // `with_bells`) also the doorbells of the others, so a busy channel never
  // starves a quiet one. A waiting receiver that finds nothing spins on the
  // watched channels and then sleeps on the doorbells; checking the bells on
  // each empty sweep cost it a system call (an epoll_wait) per request, the
  // request arriving meanwhile.
  std::size_t sweep(bool with_bells);

  // Waits up to `timeout_ms` (-1: forever) for doorbells; answers those rung.
  std::size_t poll_bells(int timeout_ms);

  // Before sleeping: stop watching every channel, unless one has work.
  bool quiesce();
  bool any_hot_ready() const noexcept;

  // The front of the queue, unless it is a request too large for `into`.
  result<event> pop(std::span<std::byte>* into, std::size_t* size);
  bool queue_empty();
  result<event> receive(clock::time_point deadline, std::span<std::byte>* into, std::size_t* size,
                        bool wait);

  // ---- async receivers ---------------------------------------------------------

  void serve_async();

  // Waits for the doorbells on the loop. The epoll descriptor is edge
  // triggered in the loop's reactor, so a bell that rang just before the wait
  // was queued is looked for after queueing it: then the wait is cancelled
  // and its handler reads again.
  void arm();
  void fail_async(error_code ec);

  // ---- answers -------------------------------------------------------------------

  // Takes request `id` of `ch` for answering, with a reply block of `size`.
  // With `copy_from`, also copies `size` bytes from it into the block and
  // publishes the reply (one lock): the answer is complete when it returns.
  result<std::uint64_t> begin_reply(server_channel& ch, message_id id, std::size_t size,
                                    const std::byte* copy_from = nullptr);

  // Publishes the outcome of `id` to the client: a reply, aborted or failed.
  error_code finish(server_channel& ch, message_id id, detail::entry_kind kind,
                    std::uint32_t status, std::uint64_t offset, std::uint64_t length);
  // finish() with ch.state_mutex held and the message found; the caller wakes
  // the client (wake_client) after the lock when it returns no error.
  error_code publish(server_channel& ch, server_channel::message_table::iterator m,
                     detail::entry_kind kind, std::uint32_t status, std::uint64_t offset,
                     std::uint64_t length);

  // A reply of `size` bytes, written by `fill` (user code, no lock held) or
  // copied from `copy_from` (then `fill` is not called).
  error_code answer_on(server_channel& ch, message_id id, std::size_t size,
                       const std::function<void(std::span<std::byte>)>& fill,
                       const std::byte* copy_from);
  // `fill` threw: the block at `offset` goes back, and the message can be
  // answered again (or, withdrawn meanwhile, is aborted).
  void give_up_reply(server_channel& ch, message_id id, std::uint64_t offset);
  error_code reply_bytes(server_channel& ch, message_id id, std::span<const std::byte> bytes);
  error_code reject_on(server_channel& ch, message_id id, errc ec);
  // The channel an answer goes to: of a client (disconnected if gone), or of a
  // request event of this service (unknown_message for anything else);
  // forked_copy in a forked child.
  result<std::shared_ptr<server_channel>> channel_for(client_id client) const;
  result<server_channel*> channel_of(const event& request) const;
  void stop();

  // The context is going with async receives never completed: they go with
  // it (see handler_store.hpp).
  void drop_handlers() noexcept override {
    try {
      std::deque<receive_handler> dropped;  // may allocate: libstdc++'s deque does
      std::lock_guard lock(async_mutex);
      dropped.swap(async_waiters);
    } catch (const std::bad_alloc&) {  // NOLINT(bugprone-empty-catch)
      // The waiters stay (a leak at worst).
    }
  }

  handler_registration registration;  // last: see handler_registration
};

}  // namespace uipc::caps
