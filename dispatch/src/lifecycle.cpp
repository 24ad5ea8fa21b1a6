// The dispatcher's lifecycle flows: response timeouts on one timer, and the
// failsafe shutdown (one shutdown event per party, port waiters completed).
#include <boost/asio/append.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/post.hpp>
#include <deque>
#include <memory>
#include <new>

#include "engine.hpp"

namespace uipc::dispatch {

namespace asio = boost::asio;

namespace detail {

// ---------------------------------------------------------------- the context's end

void engine::drop_handlers() noexcept {
  // Moved out under the locks, destroyed after them (at the end of this
  // function, in reverse order): a handler may own a response or a listener,
  // whose detach comes back here. The registry holds the engine meanwhile.
  try {
    std::vector<receive_handler> receives;
    std::deque<std::unique_ptr<port_waiter>> port_waiters;
    std::vector<fifo<outgoing>> sends;
    sends.reserve(sockets_.size());
    {
      std::lock_guard lock(mutex_);
      const auto take = [&](party* p) {
        if (!p->waiter_) return;
        receives.emplace_back();
        receives.back().swap(p->waiter_);
        p->waiter_loop_executor_ = false;
      };
      for (auto& entry : responses_) take(entry.second);
      for (party* p : exclusive_) take(p);
      for (party* p : listeners_) take(p);
      port_waiters.swap(port_waiters_);
    }
    // Not under mutex_: a socket's io_mutex comes first where both are taken.
    for (auto& s : sockets_) {
      std::lock_guard io(s->io_mutex);
      sends.emplace_back().swap(s->send_queue);  // reserved: no allocation
    }
    // The buffers back to the pool before their sends' handlers go.
    for (auto& queue : sends) {
      for (outgoing& out : queue) out.buffer.reset();
    }
  } catch (const std::bad_alloc&) {  // NOLINT(bugprone-empty-catch)
    // What was taken goes; the rest stays with the engine (a leak at worst).
  }
}

// ---------------------------------------------------------------- timeouts

void engine::link_timeout_locked(party& p, std::chrono::steady_clock::duration timeout) {
  timeout_list* list = nullptr;
  for (auto& l : timeout_lists_) {
    if (l->duration == timeout) list = l.get();
  }
  if (list == nullptr) {
    timeout_lists_.push_back(std::make_unique<timeout_list>());
    list = timeout_lists_.back().get();
    list->duration = timeout;
  }
  p.deadline_ = std::chrono::steady_clock::now() + timeout;
  p.timeouts_ = list;
  p.earlier_ = list->tail;
  p.later_ = nullptr;
  (list->tail ? list->tail->later_ : list->head) = &p;
  list->tail = &p;
  if (p.deadline_ < armed_for_) arm_timer_locked();
}

void engine::unlink_timeout_locked(party& p) noexcept {
  timeout_list* list = std::exchange(p.timeouts_, nullptr);
  if (list == nullptr) return;
  (p.earlier_ ? p.earlier_->later_ : list->head) = p.later_;
  (p.later_ ? p.later_->earlier_ : list->tail) = p.earlier_;
  p.earlier_ = p.later_ = nullptr;
  // The timer stays armed for a deadline that may be gone: it then fires
  // early, finds nothing due and re-arms. Cheaper than re-arming on every detach.
}

void engine::arm_timer_locked() {
  auto earliest = std::chrono::steady_clock::time_point::max();
  for (auto& l : timeout_lists_) {
    if (l->head && l->head->deadline_ < earliest) earliest = l->head->deadline_;
  }
  armed_for_ = earliest;
  // After shutdown, timeouts no longer matter (every party gets its shutdown
  // event): the timer must not keep the loop busy until an old deadline.
  if (earliest == std::chrono::steady_clock::time_point::max() || closed_ || shutting_down_) return;
  timer_.expires_at(earliest);  // aborts the wait for an older deadline
  timer_.async_wait([self = shared_from_this()](error_code ec) {
    if (!ec) self->on_timer();
  });
}

void engine::on_timer() {
  completions out;
  socket_list closing;
  {
    std::lock_guard lock(mutex_);
    // A wait that completed before shutdown() cancelled the timer still runs:
    // nothing may follow the shutdown event, and nothing is re-armed.
    if (shutting_down_) return;
    sweep_kept_locked(closing);  // a kept port past its lifetime closes
    const auto now = std::chrono::steady_clock::now();
    // Due responses in deadline order across the lists (a late timer may find
    // several lists due at once).
    for (;;) {
      timeout_list* first = nullptr;
      for (auto& l : timeout_lists_) {
        if (l->head && l->head->deadline_ <= now &&
            (!first || l->head->deadline_ < first->head->deadline_))
          first = l.get();
      }
      if (first == nullptr) break;
      party& p = *first->head;
      unlink_timeout_locked(p);
      p.pending_ = make_error_code(errc::timed_out);
      timeouts_.fetch_add(1, std::memory_order_relaxed);
      collect_locked(p, out);
    }
    arm_timer_locked();
  }
  close_set_aside(closing);
  run_completions(out);
}

// ---------------------------------------------------------------- failsafe shutdown

void engine::fail_locked(error_code reason, completions& out) {
  if (shutting_down_) return;
  // Room for every party's event before anything changes: collect_locked then
  // never allocates below, and a bad_alloc leaves the dispatcher as it was
  // (a later shutdown gives every party its event), not shut down with the
  // events of the parties not yet collected lost.
  out.reserve(out.size() + responses_.size() + listeners_.size() + exclusive_.size());
  shutting_down_ = true;
  stopping_.store(true, std::memory_order_relaxed);
  reason_ = reason;
  for (auto& [key, p] : responses_) collect_locked(*p, out);
  for (party* p : listeners_) collect_locked(*p, out);
  for (party* p : exclusive_) collect_locked(*p, out);
}

void engine::fail(error_code reason, bool from_loop) {
  completions out;
  // Their references on the dispatcher go at the end of this function.
  std::deque<std::unique_ptr<port_waiter>> waiters;
  {
    std::lock_guard lock(mutex_);
    fail_locked(reason, out);
    timer_.cancel();  // timeouts no longer matter: every party gets its shutdown event
    waiters.swap(port_waiters_);
  }
  {
    // Exclusive sockets are no longer read: the wait on their set ends.
    std::lock_guard lock(slots_mutex_);
    if (exclusive_set_armed_) {
      error_code ignored;
      exclusive_set_->cancel(ignored);
      exclusive_set_armed_ = false;
    }
  }
  for (auto& w : waiters) {
    asio::post(ctx_, asio::append(std::move(w->handler), make_error_code(errc::shutting_down),
                                  response{}));
  }
  close_kept();  // no response is made from here on
  // Nothing more is read: cancel the armed receives, so that a loop with no
  // other work can finish.
  for (auto& s : sockets_) {
    std::lock_guard io(s->io_mutex);
    error_code ignored;
    s->socket.cancel(ignored);
  }
  // Sends that had not gone out will not.
  for (auto& s : sockets_) {
    fifo<outgoing> unsent;
    {
      std::lock_guard io(s->io_mutex);
      unsent.swap(s->send_queue);
    }
    std::uint32_t returned = 0;
    for (auto& o : unsent) {
      if (o.buffer) ++returned;
      o.buffer.reset();
      if (o.handler) {
        asio::post(ctx_, asio::append(std::move(o.handler), make_error_code(errc::shutting_down)));
      }
    }
    if (returned != 0) {
      std::lock_guard lock(mutex_);
      if (!closed_) lent_buffers_ -= returned;
    }
  }
  if (from_loop) {
    run_completions(out);
  } else {
    post_completions(out);  // from an application call: never a handler inside it
  }
}

}  // namespace detail
}  // namespace uipc::dispatch
