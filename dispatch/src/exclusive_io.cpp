// Exclusive ports, the I/O: the sockets' own epoll set on the loop, reading and
// checking replies, sending, and a socket error that ends one transaction.
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <boost/asio/error.hpp>
#include <boost/asio/post.hpp>
#include <boost/container/static_vector.hpp>
#include <cerrno>
#include <cstring>
#include <new>
#include <span>

#include "engine.hpp"

namespace uipc::dispatch::detail {

namespace asio = boost::asio;

// ---------------------------------------------------------------- the epoll set

error_code engine::watch_exclusive(const std::shared_ptr<exclusive_socket>& xs) {
  try {
    std::lock_guard lock(slots_mutex_);
    if (!exclusive_set_) {
      auto set = std::make_unique<asio::posix::stream_descriptor>(ctx_);  // may throw: first
      const int fd = ::epoll_create1(EPOLL_CLOEXEC);
      if (fd < 0) return errno_code(errno);
      error_code ec;
      set->assign(fd, ec);
      if (ec) {
        ::close(fd);
        return ec;
      }
      exclusive_set_ = std::move(set);
    }
    std::uint32_t slot;
    if (!free_slots_.empty()) {
      slot = free_slots_.back();
    } else {
      slot = static_cast<std::uint32_t>(slots_.size());
      free_slots_.reserve(slots_.size() + 1);  // unwatch_exclusive must not allocate
      slots_.emplace_back();                   // may throw: nothing changed yet
    }
    exclusive_slot& entry = slots_[slot];
    // Edge-triggered: a reader that reads until EAGAIN needs no re-arming, and
    // each new datagram is a new edge.
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLET;
    ev.data.u64 = std::uint64_t{entry.generation + 1} << 32 | slot;
    {
      std::lock_guard io(xs->io_mutex);
      if (::epoll_ctl(exclusive_set_->native_handle(), EPOLL_CTL_ADD, xs->fd, &ev) != 0)
        return errno_code(errno);
    }
    if (!free_slots_.empty() && free_slots_.back() == slot) free_slots_.pop_back();
    entry.generation += 1;
    entry.socket = xs;
    xs->slot = slot;
    xs->generation = entry.generation;
    xs->registered = true;
    ++watched_;
    return {};  // waited on once a transaction is on it (activate_exclusive)
  } catch (const std::bad_alloc&) {
    return make_error_code(boost::system::errc::not_enough_memory);
  }
}

void engine::unwatch_exclusive(exclusive_socket& xs) noexcept {
  std::shared_ptr<exclusive_socket> last;  // released after the lock
  std::lock_guard lock(slots_mutex_);
  if (!xs.registered) return;
  xs.registered = false;
  exclusive_slot& entry = slots_[xs.slot];
  last = std::move(entry.socket);
  free_slots_.push_back(xs.slot);  // no allocation: reserved as slots_ grew
  --watched_;
}

// Under the engine's mutex (the slots mutex nests inside it).
void engine::activate_exclusive(exclusive_socket& xs) noexcept {
  std::lock_guard lock(slots_mutex_);
  if (xs.active || !xs.registered) return;
  xs.active = true;
  ++active_;
  if (!exclusive_set_armed_ && !exclusive_set_busy_) {
    try {
      arm_exclusive_set_locked();
    } catch (const std::bad_alloc&) {  // NOLINT(bugprone-empty-catch)
      // asio could not allocate the wait: the reply is read at the next
      // arming (another transaction's, or the set's busy reader's end); until
      // then this transaction's timeout stands.
    }
  }
}

// Under the engine's mutex, like activate_exclusive.
void engine::park_exclusive(exclusive_socket& xs) noexcept {
  std::lock_guard lock(slots_mutex_);
  if (!xs.active) return;
  xs.active = false;
  if (--active_ == 0 && exclusive_set_armed_) {
    // Nothing left to wait for: the loop must be free to finish (kept sockets
    // do not hold it). The cancelled wait's completion is stale (see
    // arm_exclusive_set_locked).
    error_code ignored;
    exclusive_set_->cancel(ignored);
    exclusive_set_armed_ = false;
  }
}

void engine::arm_exclusive_set_locked() {
  if (stopping_.load(std::memory_order_relaxed) || active_ == 0) return;
  // Numbered: a wait cancelled and replaced by a new one completes later,
  // and must then leave the new one's state alone.
  const std::uint64_t wait = ++exclusive_set_waits_;
  exclusive_set_->async_wait(
      asio::posix::descriptor_base::wait_read,
      [self = shared_from_this(), wait](error_code ec) { self->on_exclusive_set_ready(ec, wait); });
  exclusive_set_armed_ = true;  // once asio took the wait (it may throw bad_alloc)
}

void engine::on_exclusive_set_ready(error_code ec, std::uint64_t wait) {
  {
    std::lock_guard lock(slots_mutex_);
    if (wait != exclusive_set_waits_) return;  // a cancelled wait, replaced since
    exclusive_set_armed_ = false;
    if (ec || !exclusive_set_) return;  // cancelled: nothing watched, a shutdown, or closing
    exclusive_set_busy_ = true;         // one reader of the set at a time: replies stay in order
  }
  using ready_list = boost::container::static_vector<std::shared_ptr<exclusive_socket>, 64>;
  ready_list ready;  // before the scope below, which reads it while unwinding
  // Ends this thread's turn as the set's reader, however the turn ends. A
  // reply handler runs inline (read_exclusive delivers) and may throw through
  // io_context::run to the application, which may run the loop again: the set
  // must then still be waited on (no exclusive reply would ever be read
  // again), and the sockets found ready but not read yet get a notice of their
  // own (edge-triggered, they would report nothing new). The socket being
  // read when the throw came posts its own (read_exclusive).
  struct reader_scope {
    reader_scope(engine& e, ready_list& r) noexcept : self(e), ready(r) {}
    reader_scope(const reader_scope&) = delete;
    reader_scope& operator=(const reader_scope&) = delete;
    engine& self;
    ready_list& ready;
    std::size_t next = 0;  // ready's first socket not read yet
    ~reader_scope() {
      try {
        for (std::size_t i = next; i < ready.size(); ++i) self.post_notify_exclusive(ready[i]);
      } catch (...) {  // NOLINT(bugprone-empty-catch): no memory to post, while unwinding
        // Those sockets are read at their next datagram's edge.
      }
      std::lock_guard lock(self.slots_mutex_);
      self.exclusive_set_busy_ = false;
      if (!self.exclusive_set_ || self.exclusive_set_armed_) return;
      try {
        // Waits again (at once ready when events remain: asio's wait re-checks).
        self.arm_exclusive_set_locked();
      } catch (const std::bad_alloc&) {  // NOLINT(bugprone-empty-catch)
        // As in activate_exclusive: read at the next arming; until then the
        // transactions' timeouts stand.
      }
    }
  } scope(*this, ready);
  bool more = true;
  for (int round = 0; round < 16 && more; ++round) {
    ready.clear();
    scope.next = 0;
    {
      std::lock_guard lock(slots_mutex_);
      if (!exclusive_set_ || stopping_.load(std::memory_order_relaxed)) return;
      std::array<epoll_event, 64> events;
      const int n = ::epoll_wait(exclusive_set_->native_handle(), events.data(),
                                 static_cast<int>(events.size()), 0);
      for (int i = 0; i < n; ++i) {
        const std::uint64_t data = events[static_cast<std::size_t>(i)].data.u64;
        const auto slot = static_cast<std::uint32_t>(data);
        const auto generation = static_cast<std::uint32_t>(data >> 32);
        // A socket closed (and its slot reused) since the event was queued: skipped.
        if (slot < slots_.size() && slots_[slot].generation == generation && slots_[slot].socket)
          ready.push_back(slots_[slot].socket);
      }
      more = n == static_cast<int>(events.size());
    }
    while (scope.next < ready.size()) {
      // Counted as read before it is: one whose read throws posts its own turn.
      const std::shared_ptr<exclusive_socket>& xs = ready[scope.next++];
      notify_exclusive(xs);
    }
  }
}

// ---------------------------------------------------------------- reading

namespace {

// The ownership of a socket's reads (exclusive_socket::reading) that a
// read_exclusive call holds: handed on (to a read posted or waiting for a
// buffer), given up at a drained socket, or else given up on the way out (a
// shutdown, a closed socket, a throw that could not post a turn).
class read_turn {
 public:
  explicit read_turn(exclusive_socket& xs) noexcept : xs_(xs) {}
  read_turn(const read_turn&) = delete;
  read_turn& operator=(const read_turn&) = delete;
  ~read_turn() {
    if (!held_) return;
    std::lock_guard io(xs_.io_mutex);
    xs_.reading = false;
    xs_.read_again = false;
  }
  /// A read posted, or waiting for a buffer, owns the reads now.
  void handed_on() noexcept { held_ = false; }
  /// Under io_mutex, at a read that found the socket drained (or failed): the
  /// next datagram is a new edge, whose notice finds no owner.
  void end_locked() noexcept {
    xs_.reading = false;
    held_ = false;
  }
  /// The socket was drained at the last read, whose datagrams are delivered
  /// since: gives up the reads, unless a notice came meanwhile (false: its
  /// datagram may have come after that read, and no new edge will tell).
  bool end() {
    std::lock_guard io(xs_.io_mutex);
    if (xs_.read_again) return false;
    end_locked();
    return true;
  }

 private:
  exclusive_socket& xs_;
  bool held_ = true;
};

}  // namespace

void engine::notify_exclusive(const std::shared_ptr<exclusive_socket>& xs) {
  {
    std::lock_guard io(xs->io_mutex);
    if (xs->reading) {
      // A read runs, is posted, or waits for a buffer: a second one could
      // deliver this socket's datagrams out of order (or wait for a buffer
      // too, one more waiter per datagram). The owner reads once more.
      xs->read_again = true;
      return;
    }
    xs->reading = true;
    xs->read_again = false;
  }
  read_exclusive(xs, pooled_buffer{});
}

void engine::post_notify_exclusive(const std::shared_ptr<exclusive_socket>& xs) {
  asio::post(ctx_, [self = shared_from_this(), xs] { self->notify_exclusive(xs); });
}

void engine::read_exclusive(const std::shared_ptr<exclusive_socket>& xs, pooled_buffer buffer) {
  read_turn turn(*xs);
  pooled_buffer second;
  // Buffers taken but not filled go back at once, and may be what a shared
  // socket stopped on the dry pool waits for.
  const auto give_back = [&] {
    const bool held = buffer || second;
    buffer.reset();
    second.reset();
    if (held) exclusive_buffers_back();
  };
  // Usually one datagram (the reply); bounded per wake-up like the shared socket.
  for (int round = 0; round < 16; ++round) {
    if (stopping_.load(std::memory_order_relaxed)) {  // no more reads after shutdown
      give_back();
      return;
    }
    if (!buffer) buffer = pool_->try_acquire();
    if (!buffer) {
      // The pool is dry: read when a buffer comes back (the datagram waits in
      // the socket meanwhile), as the shared socket does. The waiter owns the
      // reads: the notices meanwhile add no waiter of their own.
      pool_->async_acquire([self = shared_from_this(), xs](error_code ec, pooled_buffer b) {
        if (!ec) {
          self->read_exclusive(xs, std::move(b));
        } else {
          read_turn aborted(*xs);  // the pool's waiters were cancelled (a shutdown)
        }
      });
      turn.handed_on();
      return;
    }
    // Two at a time: a read that fills only the first shows the socket
    // drained (edge-triggered: the next datagram is a new edge) without a
    // second read that fails with EAGAIN, which would cost a system call per reply.
    if (!second) second = pool_->try_acquire();
    std::array<sockaddr_storage, 2> from{};
    std::array<iovec, 2> iov{iovec{buffer.data(), buffer.size()},
                             iovec{second ? second.data() : nullptr, second ? second.size() : 0}};
    std::array<mmsghdr, 2> h{};
    for (std::size_t i = 0; i < h.size(); ++i) {
      h[i].msg_hdr.msg_name = &from[i];
      h[i].msg_hdr.msg_namelen = sizeof from[i];
      h[i].msg_hdr.msg_iov = &iov[i];
      h[i].msg_hdr.msg_iovlen = 1;
    }
    const int want = second ? 2 : 1;
    int got = -1;
    int err = 0;
    bool closed;
    {
      std::lock_guard io(xs->io_mutex);
      closed = xs->closed;
      if (!closed) {
        xs->read_again = false;  // this read sees the datagrams of the notices so far
        got = ::recvmmsg(xs->fd, h.data(), static_cast<unsigned>(want), MSG_DONTWAIT, nullptr);
        if (got < 0) err = errno;
        if (got < 0 && err != EINTR) turn.end_locked();  // drained, or an error ends the read
      }
    }
    if (closed) {
      give_back();
      return;
    }
    if (got < 0) {
      if (err == EINTR) continue;
      give_back();
      if (err == EAGAIN || err == EWOULDBLOCK) return;  // drained: the next datagram is a new edge
      // ECONNREFUSED, EHOSTUNREACH, ...: the peer's ICMP error, reported on this
      // connected socket alone. This transaction fails; nothing else does (a
      // kept socket with no transaction is spoiled: it closes instead of serving).
      fail_transaction(*xs, errno_code(err));
      return;
    }
    std::array<pooled_buffer, 2> filled{std::move(buffer), std::move(second)};
    if (got < want) {
      // One read, one datagram: the second buffer goes back unfilled.
      second = std::move(filled[1]);
      give_back();
    }
    try {
      deliver_exclusive(*xs, std::span(filled).first(static_cast<std::size_t>(got)), h.data(),
                        from.data());
    } catch (...) {
      // A handler threw: the datagrams still waiting (a full read may have
      // left some, or a notice came since) are read in a turn of their own,
      // as below.
      try {
        if (got == want || !turn.end()) {
          post_read_exclusive(xs);
          turn.handed_on();
        }
      } catch (const std::bad_alloc&) {  // NOLINT(bugprone-empty-catch): the handler's goes on
        // Read at the socket's next datagram's edge (the turn gives up the reads).
      }
      throw;
    }
    if (got < want && turn.end()) return;  // drained, and no notice since: the reads end
  }
  // Bounded per turn: the rest is read in a turn of its own (no new edge would
  // come for datagrams already waiting).
  give_back();
  post_read_exclusive(xs);
  turn.handed_on();
}

void engine::post_read_exclusive(const std::shared_ptr<exclusive_socket>& xs) {
  asio::post(ctx_, [self = shared_from_this(), xs] { self->read_exclusive(xs, pooled_buffer{}); });
}

void engine::exclusive_buffers_back() {
  // Pairs with the fence in restart_locked: the buffers went back before it,
  // the flag is read after it.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (stopped_on_dry_pool_.load(std::memory_order_relaxed)) restart(false);
}

void engine::deliver_exclusive(exclusive_socket& xs, std::span<pooled_buffer> buffers,
                               const mmsghdr* headers, const sockaddr_storage* from) {
  exclusive_received_.fetch_add(buffers.size(), std::memory_order_relaxed);
  received_.fetch_add(buffers.size(), std::memory_order_relaxed);
  completions out;
  bool dropped = false;
  {
    // Both datagrams of a read are queued before any handler runs: one that
    // throws loses neither.
    std::lock_guard lock(mutex_);
    for (std::size_t i = 0; i < buffers.size(); ++i) {
      queued_message m{std::move(buffers[i]), headers[i].msg_len, xs.peer, 0, 0};
      try {
        deliver_exclusive_locked(xs, m, (headers[i].msg_hdr.msg_flags & MSG_TRUNC) != 0, from[i],
                                 out);
      } catch (const std::bad_alloc&) {
        dropped_no_memory_.fetch_add(1, std::memory_order_relaxed);
      }
      if (m.buffer) {
        buffers[i] = std::move(m.buffer);  // dropped: given back once unlocked
        dropped = true;
      }
    }
  }
  if (dropped) {
    for (pooled_buffer& b : buffers) b.reset();  // not under the lock: the pool may serve a waiter
    try {
      exclusive_buffers_back();        // before the handlers run: one may throw
    } catch (const std::bad_alloc&) {  // NOLINT(bugprone-empty-catch)
      // The handlers below run all the same; a stopped shared socket restarts
      // at the next buffer that comes back.
    }
  }
  run_completions(out);
}

// Checks a datagram read on an exclusive socket once, then queues it for its
// response or leaves it in `m` (dropped by the caller).
void engine::deliver_exclusive_locked(exclusive_socket& xs, queued_message& m, bool truncated,
                                      const sockaddr_storage& from, completions& out) {
  const framing& f = options_.frame;
  if (truncated || m.size < f.header_size) {
    dropped_short_.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  if (shutting_down_) return;  // nothing is delivered after the shutdown event
  party* p = xs.owner;
  const std::span<const std::byte> data(m.buffer.data(), m.size);
  // The kernel matched the source to the connected peer; checked again all the
  // same (the socket is the only witness, and the check costs nothing).
  udp::endpoint sender;
  std::memcpy(sender.data(), &from,
              from.ss_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in));
  m.id = f.read_id(data);
  if (p == nullptr || !p->attached_ || p->failed_ || sender != xs.peer || !f.is_response(data) ||
      m.id != p->key_.id) {
    exclusive_dropped_unmatched_.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  if (p->queue_.size() >= options_.max_queued_per_response) {
    dropped_queue_full_.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  p->queue_.push_back(std::move(m));
  p->answered_ = true;
  collect_locked(*p, out);
}

void engine::fail_transaction(exclusive_socket& xs, error_code ec) {
  completions out;
  {
    std::lock_guard lock(mutex_);
    party* p = xs.owner;
    if (p == nullptr) xs.spoiled = true;
    if (p == nullptr || !p->attached_ || p->failed_ || shutting_down_) return;
    p->failed_ = ec;
    unlink_timeout_locked(*p);  // over: no timeout follows
    exclusive_socket_errors_.fetch_add(1, std::memory_order_relaxed);
    collect_locked(*p, out);
  }
  run_completions(out);
}

// ---------------------------------------------------------------- sending

result<void> engine::send_exclusive(party* p, std::span<const std::byte> message) {
  // The shared socket's limit, so that a message behaves the same in either mode.
  if (message.size() > pool_->buffer_size()) return make_error_code(errc::message_too_large);
  std::shared_ptr<exclusive_socket> xs;
  {
    std::lock_guard lock(mutex_);
    if (!p->attached_) return make_error_code(errc::detached);
    if (shutting_down_) return make_error_code(errc::shutting_down);
    xs = p->exclusive_;
    ++p->exclusive_sends_;
  }
  if (!xs) return make_error_code(errc::detached);
  ssize_t sent;
  int err = 0;
  {
    std::lock_guard io(xs->io_mutex);
    if (xs->closed) return make_error_code(errc::detached);
    do {
      sent = ::send(xs->fd, message.data(), message.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    if (sent < 0) err = errno;
  }
  if (sent < 0) {
    send_errors_.fetch_add(1, std::memory_order_relaxed);
    if (err == EMSGSIZE) return make_error_code(errc::message_too_large);
    return errno_code(err);
  }
  sent_.fetch_add(1, std::memory_order_relaxed);
  return {};
}

}  // namespace uipc::dispatch::detail
