// The service's receiver: the channels read into one queue under the pump
// (watched channels swept while they are busy, doorbells once they are quiet),
// for blocking receivers and for async ones waiting on the loop.
#include <sys/epoll.h>

#include <cstring>
#include <optional>

#include "bell.hpp"
#include "completion.hpp"
#include "service_impl.hpp"
#include "uipc/core/wait_policy.hpp"

namespace uipc::caps {

namespace asio = boost::asio;
using detail::clear_eventfd;

// ---- the receiver (pump lock held) ----------------------------------------------

std::size_t service::impl::drain(const std::shared_ptr<server_channel>& ch) {
  thread_local std::vector<event> events;  // reused: no allocation per drain
  events.clear();
  bool ok;
  {
    std::lock_guard lock(ch->read_mutex);
    if (ch->read_closed) return 0;
    ok = ch->drain(events);
    if (!ok) ch->read_closed = true;
    if (!events.empty()) {
      std::lock_guard qlock(queue_mutex);
      for (auto& e : events) {
        if (e.kind == event_kind::request)
          counters.requests.fetch_add(1, std::memory_order_relaxed);
        if (e.kind == event_kind::dispose)
          counters.disposals.fetch_add(1, std::memory_order_relaxed);
        if (e.kind == event_kind::withdrawn)
          counters.withdrawals.fetch_add(1, std::memory_order_relaxed);
        queue.push_back(std::move(e));
      }
      queued.store(queue.size(), std::memory_order_release);
    }
  }
  const std::size_t n = events.size();
  events.clear();  // the channel references go now, not at the next drain
  if (!ok) violation(ch);
  return n;
}

void service::impl::make_hot(const std::shared_ptr<server_channel>& ch) {
  ch->idle_sweeps = 0;
  if (ch->hot) return;
  ch->hot = true;
  ch->shared->server_watching.store(1, std::memory_order_seq_cst);
  hot.push_back(ch);
}

bool service::impl::cool(server_channel& ch) {
  ch.shared->server_watching.store(0, std::memory_order_seq_cst);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (ch.maybe_ready() && !ch.read_closed) {
    ch.shared->server_watching.store(1, std::memory_order_seq_cst);
    return false;
  }
  ch.hot = false;
  return true;
}

std::size_t service::impl::sweep(bool with_bells) {
  std::size_t found = 0;
  for (std::size_t i = 0; i < hot.size();) {
    auto& ch = hot[i];
    const std::size_t n = ch->read_closed ? 0 : drain(ch);
    found += n;
    if (ch->read_closed || (n == 0 && ++ch->idle_sweeps > 4096 && cool(*ch))) {
      ch->hot = false;
      hot[i] = std::move(hot.back());
      hot.pop_back();
      continue;
    }
    if (n > 0) ch->idle_sweeps = 0;
    ++i;
  }
  if (with_bells || ++sweeps_since_poll >= 64) {
    sweeps_since_poll = 0;
    found += poll_bells(0);
  }
  return found;
}

std::size_t service::impl::poll_bells(int timeout_ms) {
  epoll_event ready[64];
  const int n = ::epoll_wait(epoll.get(), ready, 64, timeout_ms);
  std::size_t found = 0;
  for (int i = 0; i < n; ++i) {
    if (ready[i].data.u64 == 0) {
      clear_eventfd(control_bell.get());
      ++found;  // the queue may have grown
      continue;
    }
    auto ch = find(ready[i].data.u64);
    if (!ch) continue;
    detail::clear_bell(ch->bell.get());
    if (timeout_ms != 0) counters.doorbells.fetch_add(1, std::memory_order_relaxed);
    make_hot(ch);
    found += drain(ch);
  }
  return found;
}

bool service::impl::quiesce() {
  for (auto& ch : hot) {
    if (!cool(*ch)) {
      for (auto& other : hot) {
        if (!other->hot) {
          other->hot = true;
          other->shared->server_watching.store(1, std::memory_order_seq_cst);
        }
      }
      return false;
    }
  }
  hot.clear();
  return true;
}

bool service::impl::any_hot_ready() const noexcept {
  for (const auto& ch : hot) {
    if (ch->maybe_ready()) return true;
  }
  return false;
}

result<event> service::impl::pop(std::span<std::byte>* into, std::size_t* size) {
  // Most looks find it empty: they take no lock. Whoever pushes an event
  // outside the receiver's own sweep rings the control bell after it
  // (push_events, an answer's drain), so a receiver about to sleep wakes.
  if (queued.load(std::memory_order_acquire) == 0) return make_error_code(uipc::errc::timed_out);
  std::lock_guard lock(queue_mutex);
  if (queue.empty()) return make_error_code(uipc::errc::timed_out);
  event& front = queue.front();
  if (into != nullptr && front.kind == event_kind::request) {
    *size = front.length_;
    if (front.length_ > into->size()) return make_error_code(errc::buffer_too_small);
    std::memcpy(into->data(), front.data_, front.length_);
    front.data_ = into->data();
  }
  event e = std::move(front);
  queue.pop_front();
  queued.store(queue.size(), std::memory_order_release);
  return e;
}

bool service::impl::queue_empty() { return queued.load(std::memory_order_acquire) == 0; }

result<event> service::impl::receive(clock::time_point deadline, std::span<std::byte>* into,
                                     std::size_t* size, bool wait) {
  if (fork.forked_copy()) return make_error_code(errc::forked_copy);
  std::unique_lock pump(pump_mutex, std::defer_lock);
  if (!pump.try_lock_until(deadline)) return make_error_code(uipc::errc::timed_out);
  auto& policy = wait_policy::this_thread();
  for (bool again = false;; again = true) {
    auto e = pop(into, size);
    // Once stopped, only errc::stopped: not the events the stop itself queued.
    if (stopped.load()) return make_error_code(errc::stopped);
    if (e || e.error() != make_error_code(uipc::errc::timed_out)) return e;
    // A pass that found no event: a client writing entries that make none (an
    // abort of nothing, say) keeps the loop going round, never asleep.
    if (again && deadline != clock::time_point::max() && clock::now() >= deadline)
      return make_error_code(uipc::errc::timed_out);
    // A receiver that waits reads the bells before it sleeps, after its spin.
    if (sweep(!wait || hot.empty()) > 0) continue;
    if (!wait) return make_error_code(uipc::errc::timed_out);
    if (!hot.empty()) {
      const auto budget = policy.spin_budget(options.max_spin);
      const auto start = budget.count() > 0 ? clock::now() : clock::time_point{};
      if (policy.spin_then_yield(options.max_spin, budget, start, deadline,
                                 [&] { return any_hot_ready(); })) {
        continue;
      }
    }
    if (!quiesce()) continue;
    int timeout_ms = -1;
    if (deadline != clock::time_point::max()) {
      const auto left = deadline - clock::now();
      if (left <= clock::duration::zero()) return make_error_code(uipc::errc::timed_out);
      timeout_ms = static_cast<int>(
          std::min<long long>(std::chrono::ceil<std::chrono::milliseconds>(left).count(), 1 << 30));
    }
    poll_bells(timeout_ms);
  }
}

// ---- async receivers ---------------------------------------------------------

void service::impl::serve_async() {
  // A forked child's copy (its loop run after notify_fork, with the waits the
  // parent had armed) must not drain the parent's rings and bells.
  if (fork.forked_copy()) return fail_async(make_error_code(errc::forked_copy));
  for (;;) {
    {
      std::lock_guard lock(async_mutex);
      if (async_waiters.empty()) return;
      if (async_armed) {
        // The armed wait sleeps on doorbells, and clients ring only on
        // channels that were quiesced; a pump that delivered an event and
        // left (no receiver was waiting then) left its channels hot. Wake
        // the wait: its handler pumps, and quiesces before it sleeps again.
        boost::system::error_code ignored;
        epoll_desc.cancel(ignored);
        return;
      }
    }
    std::unique_lock pump(pump_mutex, std::try_to_lock);
    if (!pump.owns_lock()) {
      arm();
      return;
    }
    // The receiver is taken while the pump is held, before an event is
    // popped: two threads here at once (a posted start and the armed wait's
    // handler) must never pop two events for one receiver.
    std::optional<receive_handler> handler;
    {
      std::lock_guard lock(async_mutex);
      if (async_waiters.empty()) return;
      // Moved by construction: Boost 1.81's any_completion_handler move
      // assignment recurses without end.
      handler.emplace(std::move(async_waiters.front()));
      async_waiters.pop_front();
    }
    event ev;
    error_code ec;
    if (stopped.load()) {
      ec = make_error_code(errc::stopped);
    } else {
      auto e = pop(nullptr, nullptr);
      if (!e && sweep(true) > 0) e = pop(nullptr, nullptr);
      if (e) {
        ev = std::move(*e);
      } else {
        {
          std::lock_guard lock(async_mutex);  // no event for it: first in line again
          async_waiters.push_front(std::move(*handler));
        }
        if (!quiesce()) continue;
        pump.unlock();
        arm();
        return;
      }
    }
    pump.unlock();
    detail::post_completion(ctx, std::move(*handler), ec, std::move(ev));
  }
}

void service::impl::arm() {
  // Under async_mutex: serve_async() may cancel the wait from another thread.
  std::lock_guard lock(async_mutex);
  if (async_armed) return;
  async_armed = true;
  epoll_desc.async_wait(asio::posix::stream_descriptor::wait_read,
                        [self = shared_from_this()](error_code) {
                          {
                            std::lock_guard lock(self->async_mutex);
                            self->async_armed = false;
                          }
                          self->serve_async();
                        });
  epoll_event probe;
  if (::epoll_wait(epoll.get(), &probe, 1, 0) > 0 || !queue_empty() || stopped.load()) {
    boost::system::error_code ignored;
    epoll_desc.cancel(ignored);
  }
}

void service::impl::fail_async(error_code ec) {
  std::deque<receive_handler> waiters;
  {
    std::lock_guard lock(async_mutex);
    waiters.swap(async_waiters);
  }
  for (auto& h : waiters) detail::post_completion(ctx, std::move(h), ec, event{});
}

}  // namespace uipc::caps
