// The dispatcher's parties: adding responses and listeners, delivering their events,
// cancel and detach. Response timeouts and the failsafe shutdown: lifecycle.cpp.
#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <boost/asio/append.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/ip/v6_only.hpp>
#include <boost/asio/post.hpp>
#include <cassert>
#include <cerrno>
#include <cstdlib>  // arc4random_buf (glibc 2.36)
#include <cstring>
#include <new>
#include <optional>
#include <stdexcept>

#include "engine.hpp"

namespace uipc::dispatch {

namespace asio = boost::asio;

namespace detail {

// ---------------------------------------------------------------- attach

std::uint16_t engine::next_random_locked() {
  if (random_left_ == 0) {
    // A CSPRNG (getrandom-backed), drawn in bulk: IDs an observer cannot predict
    // from the ones it saw, at the cost of one system call per 1024 IDs.
    ::arc4random_buf(random_.data(), sizeof random_);
    random_left_ = random_.size();
  }
  return random_[--random_left_];
}

result<std::uint16_t> engine::allocate_id_locked(const peer_key& peer) {
  auto it = per_peer_.find(peer);
  const std::uint32_t live = it == per_peer_.end() ? 0 : it->second;
  if (live >= 65536) return make_error_code(errc::no_free_id);
  id_key key{peer, 0};
  // Random probes while at most 3/4 of the IDs are taken (expected < 4 probes);
  // beyond that, a scan from a random start ends for sure.
  if (live < 49152) {
    for (int tries = 0; tries < 64; ++tries) {
      key.id = next_random_locked();
      if (!responses_.contains(key)) return key.id;
    }
  }
  const std::uint16_t start = next_random_locked();
  for (std::uint32_t i = 0; i < 65536; ++i) {
    key.id = static_cast<std::uint16_t>(start + i);
    if (!responses_.contains(key)) return key.id;
  }
  return make_error_code(errc::no_free_id);
}

result<response> engine::add_response(dispatcher& owner, const udp::endpoint& peer,
                                      const response_options& options) {
  if (mode_of(options) == port_mode::exclusive) return add_exclusive(owner, peer, options);
  if (peer.address().is_v6() != local_.address().is_v6())
    return make_error_code(asio::error::address_family_not_supported);
  auto p = std::make_unique<party>(*this, ref_ptr<dispatcher>(&owner), party::role::response);
  p->peer_ = peer;
  p->local_port_ = local_.port();
  sockets_to_arm to_arm;
  completions out;
  out.reserve(1);
  {
    std::lock_guard lock(mutex_);
    if (shutting_down_) return make_error_code(errc::shutting_down);
    const peer_key pk = peer_key::of(peer);
    auto id = allocate_id_locked(pk);
    if (!id) return id.error();
    p->key_ = {pk, *id};
    p->serial_ = next_serial_++;
    // Both maps, or neither: a throw here must not leave either one naming a
    // party that the unique_ptr is about to free.
    std::uint32_t& live = per_peer_[pk];  // may throw: nothing else changed yet
    ++live;
    try {
      responses_.emplace(p->key_, p.get());
      try {
        if (options.timeout.count() > 0) link_timeout_locked(*p, options.timeout);
      } catch (...) {
        responses_.erase(p->key_);
        throw;
      }
    } catch (...) {
      if (--per_peer_[pk] == 0) per_peer_.erase(pk);
      throw;
    }
    restart_locked(to_arm, out);
  }
  for (auto* s : to_arm) arm(*s);
  post_completions(out);
  return response(p.release());
}

result<listener> engine::add_listener(dispatcher& owner) {
  auto p = std::make_unique<party>(*this, ref_ptr<dispatcher>(&owner), party::role::listener);
  sockets_to_arm to_arm;
  completions out;
  out.reserve(1);  // restart_locked's one possible no_buffers event
  {
    std::lock_guard lock(mutex_);
    if (shutting_down_) return make_error_code(errc::shutting_down);
    listeners_.push_back(p.get());
    restart_locked(to_arm, out);
  }
  for (auto* s : to_arm) arm(*s);
  post_completions(out);
  return listener(p.release());
}

// ---------------------------------------------------------------- delivery

bool engine::deliverable_locked(const party& p) const noexcept {
  if (!p.attached_) return false;
  if (p.pending_) return true;
  if (p.failed_ && !p.failure_delivered_) return true;
  if (p.role_ == party::role::response ? !p.queue_.empty() : !queries_.empty()) return true;
  return shutting_down_ && !p.shutdown_delivered_;
}

// Hands the party its next event, if it waits, holds none, and one is there.
// Order: queued messages (a response's timeout after its queued replies; a
// listener's no_buffers before the queries that hold the buffers), then shutdown.
void engine::collect_locked(party& p, completions& out) {
  if (!p.waiter_ || p.lent_ || !p.attached_) return;
  enum class source : std::uint8_t { no_buffers, query, reply, timeout, failed, shutdown };
  source from;
  if (p.role_ == party::role::listener && p.pending_) {
    from = source::no_buffers;
  } else if (p.role_ == party::role::listener && !queries_.empty()) {
    from = source::query;
  } else if (p.role_ == party::role::response && !p.queue_.empty()) {
    from = source::reply;
  } else if (p.pending_) {
    from = source::timeout;
  } else if (p.failed_ && !p.failure_delivered_) {
    from = source::failed;
  } else if (shutting_down_ && !p.shutdown_delivered_) {
    from = source::shutdown;
  } else {
    return;
  }
  // The one allocation, before any state changes: on bad_alloc the event stays
  // where it is, for a later collect. The event is then built in its place in
  // the batch (it is moved once less on the hot path).
  if (out.size() == out.capacity()) out.reserve(out.size() * 2 + 1);
  completion& c = out.emplace_back();
  event& ev = c.ev;
  auto take_message = [&](queued_message& m) {
    ev.buffer_ = std::move(m.buffer);
    ev.size_ = m.size;
    ev.peer_ = m.peer;
    ev.id_ = m.id;
    ev.socket_ = m.socket;
    ev.kind_ = event_kind::message;
    ++lent_buffers_;
  };
  switch (from) {
    case source::no_buffers:
      c.ec = std::exchange(p.pending_, {});
      ev.kind_ = event_kind::no_buffers;
      break;
    case source::query:
      take_message(queries_.front());
      queries_.pop_front();
      break;
    case source::reply:
      take_message(p.queue_.front());
      p.queue_.erase(p.queue_.begin());
      break;
    case source::timeout:
      c.ec = std::exchange(p.pending_, {});
      ev.kind_ = event_kind::timed_out;
      ev.peer_ = p.peer_;
      ev.id_ = p.key_.id;
      break;
    case source::failed:
      // Exclusive ports: the socket's error ended the transaction.
      p.failure_delivered_ = true;
      c.ec = p.failed_;
      ev.kind_ = event_kind::socket_error;
      ev.reason_ = p.failed_;
      ev.peer_ = p.peer_;
      ev.id_ = p.key_.id;
      break;
    case source::shutdown:
      // The failsafe event: made from state the party already has (the event
      // needs no allocation, and the receive it completes was allocated when
      // the party asked for it).
      p.shutdown_delivered_ = true;
      c.ec = make_error_code(errc::shutting_down);
      ev.kind_ = event_kind::shutdown;
      ev.reason_ = reason_;
      ev.peer_ = p.peer_;
      ev.id_ = p.key_.id;
      break;
  }
  if (p.idle_) {
    idle_listeners_.erase(std::find(idle_listeners_.begin(), idle_listeners_.end(), &p));
    p.idle_ = false;
  }
  p.lent_ = true;
  add_ref(&p);  // the event's reference
  ev.party_ = &p;
  c.handler.swap(p.waiter_);
  c.loop_executor = p.waiter_loop_executor_;
}

// After the party's state changed (a new waiter, an event returned): deliver
// its next event, or wait idle for a query. When this thread already runs our
// completions (the party's handler asked for more from inside one), the event
// joins that batch: run right after, with no recursion, post or second lock.
void engine::make_ready_locked(party& p, completions& out) {
  if (!p.waiter_ || p.lent_ || !p.attached_) return;
  if (deliverable_locked(p)) {
    collect_locked(p, tl_delivering == this ? *tl_batch : out);
  } else if (p.role_ == party::role::listener && !p.idle_) {
    p.idle_ = true;
    idle_listeners_.push_back(&p);
  }
}

party* engine::apply_deferred_return_locked(completions& out) {
  party* p = tl_returned;
  if (p == nullptr) return nullptr;
  p->lent_ = false;
  make_ready_locked(*p, out);  // may throw (bad_alloc): the slot then keeps the party
  tl_returned = nullptr;
  return p;
}

// Runs a completion now when its handler belongs on this thread (the common
// case: a plain handler, the loop's own executor, called from the loop);
// otherwise hands it to its executor. `on_loop`: this thread runs the loop.
void engine::invoke(completion& c, bool on_loop) {
  if (on_loop && c.loop_executor) {
    // Known when the receive started: no executor of its own to ask for.
    std::move(c.handler)(c.ec, std::move(c.ev));
    return;
  }
  const auto mine = ctx_.get_executor();
  auto ex = asio::get_associated_executor(c.handler, mine);
  const auto* target = ex.target<asio::io_context::executor_type>();
  if (target != nullptr && *target == mine && on_loop) {
    std::move(c.handler)(c.ec, std::move(c.ev));
  } else {
    asio::dispatch(ctx_, asio::append(std::move(c.handler), c.ec, std::move(c.ev)));
  }
}

void engine::run_completions(completions& batch) {
  std::size_t i = 0;
  // Restores the thread's state however the loop ends: a handler run inline
  // may throw (through io_context::run to the application); the completions
  // after it are then posted, not lost, and a deferred return is applied.
  struct scope {
    engine* self;
    completions& batch;
    std::size_t& next;
    engine* outer = std::exchange(tl_delivering, self);
    completions* outer_batch = std::exchange(tl_batch, &batch);
    party* outer_returned = std::exchange(tl_returned, nullptr);
    ~scope() {
      party* returned = nullptr;
      if (tl_returned != nullptr) {
        try {
          std::lock_guard lock(self->mutex_);
          returned = self->apply_deferred_return_locked(batch);
        } catch (...) {  // NOLINT(bugprone-empty-catch): nothing better while unwinding
        }
        if (returned == nullptr) returned = std::exchange(tl_returned, nullptr);
      }
      tl_returned = outer_returned;
      tl_batch = outer_batch;
      tl_delivering = outer;
      // Posted from where the loop stopped. Not erased first: that would
      // move-assign completions, and Boost 1.81's any_completion_handler move
      // assignment recurses without end (see outgoing in engine.hpp).
      try {
        self->post_completions(batch, next);
      } catch (...) {  // NOLINT(bugprone-empty-catch): nothing better while unwinding
      }
      batch.clear();
      if (returned != nullptr) release(returned);
    }
  } guard{this, batch, i};
  const bool on_loop = ctx_.get_executor().running_in_this_thread();
  // Handlers may append to `batch` (see make_ready_locked), which may move its
  // elements: index it, and touch an element only until its handler starts
  // (invoke moves the handler, code and event into the call before it runs).
  for (;;) {
    while (i < batch.size()) invoke(batch[i++], on_loop);
    if (tl_returned == nullptr) break;
    // The last handler replied without asking for more: its event is returned
    // now, which may deliver (into this batch) what waited for it.
    party* returned;
    {
      std::lock_guard lock(mutex_);
      returned = apply_deferred_return_locked(batch);
    }
    release(returned);
  }
}

void engine::post_completions(completions& batch, std::size_t first) {
  for (std::size_t i = first; i < batch.size(); ++i) {
    completion& c = batch[i];
    asio::post(ctx_, asio::append(std::move(c.handler), c.ec, std::move(c.ev)));
  }
  batch.clear();
}

void engine::start_receive(party* p, receive_handler handler, bool loop_executor) {
  completions out;
  error_code refuse;
  party* returned = nullptr;
  {
    std::lock_guard lock(mutex_);
    // Usually the event this handler just answered: returned first, so that
    // the query waiting for it is delivered below.
    if (tl_delivering == this) returned = apply_deferred_return_locked(*tl_batch);
    if (!p->attached_) {
      refuse = make_error_code(errc::detached);
    } else if (p->waiter_) {
      refuse = asio::error::already_started;
    } else if (p->shutdown_delivered_ && !deliverable_locked(*p)) {
      refuse = make_error_code(errc::shutting_down);
    } else {
      // Not operator=: Boost 1.81's move assignment wraps the handler in itself.
      p->waiter_.swap(handler);
      p->waiter_loop_executor_ = loop_executor;
      // An initiating function never completes inline: the event joins the
      // batch this thread is running (after the current handler), or is posted.
      if (!p->lent_ && deliverable_locked(*p)) {
        collect_locked(*p, tl_delivering == this ? *tl_batch : out);
      } else if (!p->lent_ && p->role_ == party::role::listener && !p->idle_) {
        p->idle_ = true;
        idle_listeners_.push_back(p);
      }
    }
  }
  if (returned != nullptr) release(returned);
  if (refuse) {
    asio::post(ctx_, asio::append(std::move(handler), refuse, event{}));
    return;
  }
  post_completions(out);
}

void engine::return_event(event& ev) noexcept {
  party* p = std::exchange(ev.party_, nullptr);
  const bool had_buffer = static_cast<bool>(ev.buffer_);
  ev.buffer_.reset();
  ev.size_ = 0;
  completions out;
  sockets_to_arm to_arm;
  {
    std::lock_guard lock(mutex_);
    if (had_buffer && !closed_) --lent_buffers_;
    p->lent_ = false;
    make_ready_locked(*p, out);
    if (had_buffer) restart_locked(to_arm, out);
  }
  for (auto* s : to_arm) arm(*s);
  if (!out.empty()) post_completions(out);
  release(p);
}

void engine::cancel(party* p) noexcept {
  receive_handler aborted;
  {
    std::lock_guard lock(mutex_);
    aborted.swap(p->waiter_);
    if (p->idle_) {
      idle_listeners_.erase(std::find(idle_listeners_.begin(), idle_listeners_.end(), p));
      p->idle_ = false;
    }
    unlink_timeout_locked(*p);
  }
  if (aborted) {
    asio::post(ctx_, asio::append(std::move(aborted), error_code(asio::error::operation_aborted),
                                  event{}));
  }
}

void engine::detach(party* p) noexcept {
  receive_handler aborted;
  std::vector<queued_message> dropped;
  fifo<queued_message> dropped_queries;
  std::shared_ptr<exclusive_socket> closing;
  {
    std::lock_guard lock(mutex_);
    p->attached_ = false;
    aborted.swap(p->waiter_);
    dropped.swap(p->queue_);
    if (p->idle_) {
      idle_listeners_.erase(std::find(idle_listeners_.begin(), idle_listeners_.end(), p));
      p->idle_ = false;
    }
    if (p->exclusive_) {
      // Not in responses_: its key may equal a shared response's.
      detach_exclusive_locked(*p, closing);
    } else if (p->role_ == party::role::response) {
      unlink_timeout_locked(*p);
      responses_.erase(p->key_);
      auto it = per_peer_.find(p->key_.peer);
      if (it != per_peer_.end() && --it->second == 0) per_peer_.erase(it);
    } else {
      listeners_.erase(std::find(listeners_.begin(), listeners_.end(), p));
      // With no listener left, waiting queries have no one to go to.
      if (listeners_.empty()) dropped_queries.swap(queries_);
    }
  }
  // The dropped replies and queries give their buffers back first: the
  // restart below may then find the pool no longer dry.
  dropped.clear();
  dropped_queries.clear();
  if (closing) {
    // The socket closes and its port rests; its place serves a waiter. Before
    // the handle's reference goes: a waiter's response must find us alive.
    close_exclusive(*closing);
    unreserve_exclusive();
  }
  // Decided under the mutex (not from the idle_sockets_ hint): a receive that
  // stopped on the dry pool since is restarted now.
  restart(false);
  if (aborted) {
    asio::post(ctx_, asio::append(std::move(aborted), error_code(asio::error::operation_aborted),
                                  event{}));
  }
  release(p);  // the handle's reference: may destroy the dispatcher
}

}  // namespace detail
}  // namespace uipc::dispatch
