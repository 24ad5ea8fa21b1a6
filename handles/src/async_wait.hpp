// Waiting on the event loop: the per-client waiter thread behind
// client::async_wait, async_wait_any and async_wait_all.
//
// Linux has no pollable futex, so one thread per client sleeps in futex_waitv
// on the futex words of every pending async wait of that client, plus a private
// control word bumped whenever a wait is armed, cancelled or the client goes.
// The thread never takes anything: when a word it watches moves (or a deadline,
// a cancel, the daemon's death), it hands the wait to the completion handler's
// executor, where retry() makes one non-blocking attempt through detail::wait
// (timeout zero: the very code path of the synchronous waits, so wait-all,
// abandoned mutexes and stale handles behave as there) and either completes
// the handler there or re-arms the wait with the futex values it read before
// the attempt (a change after that read is never missed: futex_waitv finds the
// word moved and returns at once). A take on the handler's executor makes a
// mutex the property of the thread that runs the handler.
//
// Sleeper counts: from admission to completion a wait counts in each of its
// slots' `waiters` and `multi_waiters`, exactly as a sleeping synchronous
// wait-any does, so a signal with "nobody asleep" still wakes this thread, and a
// wake-one wakes everybody on the slot while it watches: the thread may be
// woken for a wait that then takes nothing (a wait-all, a cancelled one), and a
// synchronous sleeper must not lose that wake.
//
// Lifetime: a wait whose handler has an executor with a context of its own (an
// io_context, a thread_pool) is registered with that context as a
// handler_store. When the context is destroyed with the wait pending, the wait
// is taken off the thread (which then never touches its executor) and its
// handler destroyed unrun, with whatever it owns (the client, perhaps).
#pragma once

#include <linux/futex.h>

#include <array>
#include <atomic>
#include <boost/asio/any_completion_executor.hpp>
#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/container/static_vector.hpp>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <variant>
#include <vector>

#include "segment.hpp"
#include "uipc/core/handler_store.hpp"
#include "uipc/handles/client.hpp"

namespace uipc::handles::detail {

struct mapping;
class waiter_core;

/// One pending async wait. Threading: retry() runs on the handler's executor and
/// never twice at once (only the waiter thread dispatches it, once per arming);
/// `cancelled` is the one field written from elsewhere (the cancellation slot),
/// and drop_handlers() runs when no thread runs the executor's context.
struct async_wait_op final : handler_store {
  using one_handler = boost::asio::any_completion_handler<void(error_code, wait_status)>;
  using many_handler = boost::asio::any_completion_handler<void(error_code, wait_result)>;

  async_wait_op() = default;
  async_wait_op(const async_wait_op&) = delete;
  async_wait_op& operator=(const async_wait_op&) = delete;
  ~async_wait_op();

  /// One attempt on the handler's executor: completes the handler, or re-arms.
  static void retry(const std::shared_ptr<async_wait_op>& self);
  /// The executor's context goes: off the thread, and the handler destroyed unrun.
  void drop_handlers() noexcept override;

  std::shared_ptr<mapping> map;  ///< keeps the slots mapped
  std::shared_ptr<waiter_core> core;
  /// Sorted by slot for a wait-all (the lock order), as given for a wait-any;
  /// positions[i] is targets[i]'s place in the caller's set.
  boost::container::static_vector<wait_target, max_wait_objects> targets;
  boost::container::static_vector<std::size_t, max_wait_objects> positions;
  /// The distinct futex words of `targets`.
  boost::container::static_vector<std::atomic<std::uint32_t>*, max_wait_objects> words;
  /// targets[i]'s seq as read before the last attempt.
  std::array<std::uint32_t, max_wait_objects> seen{};
  bool all = false;
  bool has_mutex = false;
  bool single = false;      ///< completes a one_handler
  bool registered = false;  ///< counted in the slots' sleeper counts
  bool admitted = false;    ///< counted in the core's watched words
  bool done = false;
  bool now = true;         ///< armed for an attempt at once, not for a change
  bool withdrawn = false;  ///< under the core's lock: the thread leaves it alone
  std::chrono::steady_clock::time_point deadline = std::chrono::steady_clock::time_point::max();
  /// The last attempt met a target's transaction lock, whose end bumps no
  /// futex word: tried again at this time.
  std::chrono::steady_clock::time_point lock_retry = std::chrono::steady_clock::time_point::max();
  std::chrono::nanoseconds lock_backoff{0};  ///< the last retry's delay; 0: no lock met
  error_code preset;                         ///< complete with this at the first attempt
  std::atomic<bool> cancelled{false};
  std::variant<std::monostate, one_handler, many_handler> handler;
  boost::asio::any_completion_executor executor;
  boost::asio::cancellation_slot cancel_slot;
  /// With the executor's context, when it has one of its own (last: it ends first).
  std::optional<handler_registration> registration;

 private:
  /// Done: off the slots' sleeper counts, the watched words and the slot.
  void end() noexcept;
  void finish(error_code ec, wait_result r);
  void unregister() noexcept;
};

/// The waiter thread of one client and the waits it watches.
/// Threading: every member from any thread; the thread itself runs run(). A
/// wait's last reference is never released under m_ (its destructor takes it).
class waiter_core : public std::enable_shared_from_this<waiter_core> {
 public:
  explicit waiter_core(std::shared_ptr<mapping> map) : map_(std::move(map)) {}
  /// Starts the waiter thread; the system's error when it cannot be made.
  error_code start() noexcept;
  /// Counts `op`'s words among the watched ones and registers it as a sleeper on
  /// its slots; errc::invalid_argument over max_async_wait_objects words.
  error_code admit(async_wait_op& op);
  /// Undoes admit's word count.
  void forget(async_wait_op& op) noexcept;
  /// Hands `op` to the thread (for an attempt at once if op->now); false once
  /// the client is going.
  bool arm(std::shared_ptr<async_wait_op> op);
  /// Makes the thread look at its waits again (a cancel).
  void poke() noexcept;
  /// Takes `op` off the thread for good: out of the armed waits, and, if the
  /// thread is handing it to its executor right now, once that is done (unless
  /// called on the thread itself, by that very hand-over).
  void withdraw(async_wait_op& op) noexcept;
  /// Sends every wait to its executor to complete with operation_aborted and
  /// ends the thread (joined, unless called on it).
  void stop();
  bool closed() const noexcept { return stopping_.load(); }
  bool on_waiter_thread() const noexcept { return std::this_thread::get_id() == thread_id_; }

 private:
  void run();

  std::shared_ptr<mapping> map_;  ///< null for a moved-from client
  std::mutex m_;
  std::vector<std::shared_ptr<async_wait_op>> armed_;                      // under m_
  std::vector<std::pair<std::atomic<std::uint32_t>*, unsigned>> watched_;  // under m_
  const async_wait_op* handing_ = nullptr;  ///< under m_: being given to its executor
  std::condition_variable handed_;          ///< handing_ went back to null
  std::atomic<std::uint32_t> control_{0};
  std::atomic<bool> stopping_{false};
  std::thread thread_;
  std::thread::id thread_id_;
};

/// What client holds: the core, made with the first async wait.
struct async_waiter {
  std::mutex m;
  std::shared_ptr<waiter_core> core;
};

}  // namespace uipc::handles::detail
