// The dispatcher's receive path: the restart flow, recvmmsg batches, and classifying datagrams.
#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
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
#include <thread>

#include "engine.hpp"

namespace uipc::dispatch {

namespace asio = boost::asio;

namespace detail {

// ---------------------------------------------------------------- receive

// The seed's restart flow, for every socket with no receive running.
void engine::restart_locked(sockets_to_arm& to_arm, completions& out) {
  if (idle_sockets_.load(std::memory_order_relaxed) == 0) return;
  for (auto& s : sockets_) {
    if (s->receiving) continue;
    // Stopped for a reason that no buffer coming back changes: whatever
    // changes it restarts us (an attach, for one).
    if (closed_ || shutting_down_ || receiving_stopped_.load(std::memory_order_relaxed) ||
        (responses_.empty() && listeners_.empty())) {  // no one attached
      stopped_on_dry_pool_.store(false, std::memory_order_relaxed);
      return;
    }
    if (pool_->available() == 0) {
      // Flagged before the pool is looked at again. An exclusive read gives
      // its buffers back, then looks at the flag (exclusive_buffers_back):
      // with a fence on each side, either it sees the flag or we see its
      // buffers, so a stop on buffers it held only for a moment is undone.
      stopped_on_dry_pool_.store(true, std::memory_order_relaxed);
      std::atomic_thread_fence(std::memory_order_seq_cst);
    }
    if (pool_->available() == 0) {
      if (lent_buffers_ > 0) return;  // wait for a lent buffer to come back
      // Another socket's batch holds buffers it has not classified yet: they
      // come back (or get queued) at that batch's end, which restarts us.
      if (in_batch_.load(std::memory_order_seq_cst) > 0) return;
      // Replies queued for responses hold them, on the shared socket or on
      // exclusive ports: wait (they drain when the responses receive, or
      // detach), with no error event for listeners that are not the cause.
      if (!responses_.empty() || !exclusive_.empty()) return;
      // Only listeners, and queued queries hold every buffer: tell one of them.
      party* p = listeners_[error_event_turn_++ % listeners_.size()];
      if (!p->pending_) {
        p->pending_ = make_error_code(errc::no_buffers);
        no_buffer_events_.fetch_add(1, std::memory_order_relaxed);
        try {
          collect_locked(*p, out);
        } catch (const std::bad_alloc&) {  // NOLINT(bugprone-empty-catch)
          // The event stays pending in the party: it goes with the listener's
          // next receive or returned event. The sockets decided above must
          // still be armed, so nothing propagates from here.
        }
      }
      return;
    }
    s->receiving = true;
    idle_sockets_.fetch_sub(1, std::memory_order_relaxed);
    to_arm.push_back(s.get());
  }
  stopped_on_dry_pool_.store(false, std::memory_order_relaxed);  // every idle socket is armed
}

// `from_loop`: called from one of our completions, where a handler may run at
// once; otherwise (from an application call) completions are posted.
// `stopped`: a socket whose receive ends now, marked idle under the same lock.
void engine::restart(bool from_loop, socket_state* stopped) {
  sockets_to_arm to_arm;
  completions out;
  {
    std::lock_guard lock(mutex_);
    if (stopped != nullptr) {
      stopped->receiving = false;
      idle_sockets_.fetch_add(1, std::memory_order_relaxed);
    }
    restart_locked(to_arm, out);
  }
  for (auto* s : to_arm) arm(*s);
  if (out.empty()) return;
  if (from_loop) {
    run_completions(out);
  } else {
    post_completions(out);
  }
}

void engine::restart_if_needed(bool from_loop) {
  // The hint only skips the lock on the hot path; a stale "no idle socket"
  // is harmless there (the socket that stopped restarts itself at its end).
  if (idle_sockets_.load(std::memory_order_acquire) != 0) restart(from_loop);
}

// Waits for readability, then on_readable reads with recvmmsg until EAGAIN.
// Race-free with several loop threads: asio registers a non-speculative wait
// with EPOLL_CTL_MOD, which makes the kernel re-check readiness, so a datagram
// whose edge another thread's epoll_wait took since our last read is reported.
void engine::arm(socket_state& s) {
  std::lock_guard io(s.io_mutex);
  // stopping_ is set (under mutex_) before fail() cancels the sockets under
  // io_mutex: checked here under io_mutex, a re-arm either is cancelled by
  // fail() or sees stopping_ and does not arm.
  if (s.closed || stopping_.load(std::memory_order_relaxed) ||
      receiving_stopped_.load(std::memory_order_relaxed)) {
    std::lock_guard lock(mutex_);
    s.receiving = false;
    idle_sockets_.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  s.socket.async_wait(asio::socket_base::wait_read,
                      [self = shared_from_this(), &s](error_code ec) { self->on_readable(s, ec); });
}

void engine::on_readable(socket_state& s, error_code ec) {
  auto end_receive = [&] {
    std::lock_guard lock(mutex_);
    s.receiving = false;
    idle_sockets_.fetch_add(1, std::memory_order_relaxed);
  };
  if (ec == asio::error::operation_aborted) {
    end_receive();
    return;
  }
  if (ec) {
    end_receive();
    fail(ec, true);
    return;
  }
  if (stopping_.load(std::memory_order_relaxed) ||
      receiving_stopped_.load(std::memory_order_relaxed)) {
    end_receive();
    return;
  }
  // Restores the thread's batch socket, and on a throw (a handler run inline)
  // stops this receive and restarts, so the socket is not left "receiving".
  struct scope {
    scope(engine* e, socket_state& state) noexcept
        : self(e), s(state), outer(std::exchange(tl_batch_socket, &state)) {}
    scope(const scope&) = delete;
    scope& operator=(const scope&) = delete;
    engine* self;
    socket_state& s;
    socket_state* outer;
    bool unwinding = true;  // cleared on every normal way out (std::uncaught_exceptions
                            // would cost two thread-local lookups per wake-up)
    ~scope() {
      tl_batch_socket = outer;
      if (unwinding) {
        try {
          self->flush(s, true);  // the replies its handlers made before the throw
          {
            std::lock_guard lock(self->mutex_);
            s.receiving = false;
            self->idle_sockets_.fetch_add(1, std::memory_order_release);
          }
          self->restart(false);
        } catch (...) {  // NOLINT(bugprone-empty-catch): nothing better while unwinding
        }
      }
    }
  };
  std::optional<scope> guard;
  guard.emplace(this, s);
  const std::size_t batch = options_.max_receives;
  bool drained = false;
  // Read until EAGAIN; after a bounded number of batches, yield to the loop
  // (the re-armed receive completes at once while data remains).
  for (int round = 0; round < 16 && !drained && !stopping_.load(std::memory_order_relaxed);
       ++round) {
    // The first read of a wake-up takes as many buffers as the last wake-up's
    // first read suggests, not the whole batch: each buffer taken and given back
    // unused costs four atomic operations, which at a low rate (a datagram or
    // two per wake-up) is most of the dispatcher's cost. A read that fills
    // them all is followed by one with the whole batch.
    const std::size_t want = round == 0 && s.receive_hint != 0 ? s.receive_hint : batch;
    std::size_t n = 0;
    // Counted before they are taken: another socket that finds the pool dry
    // meanwhile knows they are coming back (restart_locked).
    in_batch_.fetch_add(want, std::memory_order_seq_cst);
    const std::size_t taken = pool_->try_acquire(std::span(s.buffers).first(want));
    for (; n < taken; ++n) {
      s.vectors[n] = {s.buffers[n].data(), s.buffers[n].size()};
      auto& h = s.headers[n].msg_hdr;
      h = {};
      h.msg_name = &s.addresses[n];
      h.msg_namelen = sizeof(sockaddr_storage);
      h.msg_iov = &s.vectors[n];
      h.msg_iovlen = 1;
      s.headers[n].msg_len = 0;
    }
    in_batch_.fetch_sub(want - n, std::memory_order_seq_cst);
    if (n == 0) break;  // the pool ran dry: restart_locked decides below
    int got;
    int err = 0;
    {
      std::lock_guard io(s.io_mutex);
      if (s.closed || receiving_stopped_.load(std::memory_order_relaxed)) {
        got = -1;
        err = ECANCELED;
      } else {
        got = ::recvmmsg(s.fd, s.headers.data(), static_cast<unsigned>(n), MSG_DONTWAIT, nullptr);
        if (got < 0) err = errno;
      }
    }
    if (got < 0) {
      pool_->release(std::span(s.buffers).first(n));
      in_batch_.fetch_sub(n, std::memory_order_seq_cst);
      if (err == EAGAIN || err == EWOULDBLOCK) {
        drained = true;
        break;
      }
      if (err == EINTR) continue;
      guard->unwinding = false;
      guard.reset();
      end_receive();
      if (err != ECANCELED) fail(errno_code(err), true);
      return;
    }
    received_.fetch_add(static_cast<std::uint64_t>(got), std::memory_order_relaxed);
    completions& out = s.delivered;  // reused: no allocation per batch
    pool_->release(std::span(s.buffers).first(n).subspan(static_cast<std::size_t>(got)));
    {
      std::lock_guard lock(mutex_);
      classify_locked(s, got, out);
      in_batch_.fetch_sub(n, std::memory_order_seq_cst);
    }
    run_completions(out);
    flush(s, true);
    if (round == 0) {
      const auto read = static_cast<std::size_t>(got);
      s.receive_hint = read == n ? batch : std::min(batch, 2 * read + 2);
    }
    if (static_cast<std::size_t>(got) < n) drained = true;
  }
  guard->unwinding = false;
  guard.reset();
  restart(true, &s);
}

void engine::stop_receiving() {
  receiving_stopped_.store(true, std::memory_order_relaxed);
  // A barrier: a read holds its socket's io_mutex from its check of the flag
  // to the end of recvmmsg, so once each lock was taken no read can start.
  for (auto& s : sockets_) std::lock_guard io(s->io_mutex);
  // A batch read before that is classified under mutex_ and then leaves
  // in_batch_: wait for it (another thread's, never this one's: a handler runs
  // after its batch left in_batch_). Classification does not block, so this
  // wait is a few microseconds at most.
  while (in_batch_.load(std::memory_order_seq_cst) != 0) std::this_thread::yield();
}

// The seed's receive flow for one batch: short datagrams dropped, queries to
// an idle listener or the shared queue, replies to their response or dropped.
void engine::classify_locked(socket_state& s, int count, completions& out) {
  const framing& f = options_.frame;
  for (int i = 0; i < count; ++i) {
    pooled_buffer& buffer = s.buffers[static_cast<std::size_t>(i)];
    const std::size_t size = s.headers[static_cast<std::size_t>(i)].msg_len;
    const std::span<const std::byte> data(buffer.data(), size);
    if (size < f.header_size ||
        (s.headers[static_cast<std::size_t>(i)].msg_hdr.msg_flags & MSG_TRUNC) != 0) {
      dropped_short_.fetch_add(1, std::memory_order_relaxed);
      buffer.reset();
      continue;
    }
    if (shutting_down_) {  // nothing is delivered after the shutdown event
      buffer.reset();
      continue;
    }
    udp::endpoint from;
    const auto* sa = reinterpret_cast<const sockaddr*>(&s.addresses[static_cast<std::size_t>(i)]);
    std::memcpy(from.data(), sa,
                sa->sa_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in));
    const std::uint16_t id = f.read_id(data);
    queued_message m{std::move(buffer), size, from, id, s.index};
    // The seed's "cannot allocate": free the buffer, count, go on (the receive
    // restarts at the batch's end). Never leaves the socket stuck "receiving".
    try {
      classify_one_locked(m, data, out);
    } catch (const std::bad_alloc&) {
      if (m.buffer) {
        m.buffer.reset();
        dropped_no_memory_.fetch_add(1, std::memory_order_relaxed);
      }
    }
  }
}

void engine::classify_one_locked(queued_message& m, std::span<const std::byte> data,
                                 completions& out) {
  const framing& f = options_.frame;
  {
    const udp::endpoint& from = m.peer;
    const std::uint16_t id = m.id;
    if (!f.is_response(data)) {
      if (listeners_.empty()) {
        dropped_no_listener_.fetch_add(1, std::memory_order_relaxed);
        return;
      }
      // A listener waiting idle takes the query even with a zero-length queue
      // (an idle listener exists only while the queue is empty).
      if (queries_.size() >= options_.max_queued_queries && idle_listeners_.empty()) {
        dropped_queue_full_.fetch_add(1, std::memory_order_relaxed);
        return;
      }
      queries_.push_back(std::move(m));
      // Earlier queries first: an idle listener exists only while the queue is empty.
      if (!idle_listeners_.empty()) collect_locked(*idle_listeners_.front(), out);
      return;
    }
    auto it = responses_.find(id_key{peer_key::of(from), id});
    if (it == responses_.end()) {
      dropped_unmatched_.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    party& p = *it->second;
    if (p.queue_.size() >= options_.max_queued_per_response) {
      dropped_queue_full_.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    p.queue_.push_back(std::move(m));
    collect_locked(p, out);
  }
}

}  // namespace detail
}  // namespace uipc::dispatch
