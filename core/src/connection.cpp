// connection: the framed transport's state machine. Reads and writes go straight to
// recvmsg/sendmsg on the non-blocking socket (Asio has no SCM_RIGHTS); Asio only
// tells us when the socket is ready again. A callback state machine rather than
// a coroutine: the hot path (one frame in, one out) then costs no frame allocation.
#include <sys/socket.h>
#include <sys/un.h>

#include <algorithm>
#include <array>
#include <boost/asio/append.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/post.hpp>
#include <cerrno>
#include <climits>
#include <cstring>

#include "connection_state.hpp"
#include "wire.hpp"

namespace uipc {

namespace asio = boost::asio;
using stream_socket = asio::local::stream_protocol::socket;

namespace detail {
struct connection_access {
  static connection::impl& state(connection& c) noexcept { return *c.impl_; }
};

}  // namespace detail

namespace {

constexpr std::size_t max_iov = 64;

using detail::socket_error;

// Completes a stored handler on its own executor (default: the strand), never
// inline. Its work guard goes with `p` once the post is queued: from then on the
// post itself keeps the handler's executor busy until the handler has run.
template <class Handler, class... Args>
void complete(pending_handler<Handler> p, const connection_strand& strand, Args... args) {
  asio::post(strand, asio::append(std::move(p.handler), std::move(args)...));
}

// Whether an engine runs because the socket became readable (a handler of our
// own), or inside a call of the application (an initiating function, close).
enum class context { reactor, application };

// What one connection does on its strand. `self_` is empty only when called
// from the destructor, which never starts a wait.
class engine {
 public:
  // `self` is the caller's reference: it outlives the engine, which is a
  // temporary on the stack, so holding it costs no reference count.
  engine(connection::impl& s, const std::shared_ptr<connection>& self,
         context where = context::application)
      : s_(s), self_(self), inline_ok_(where == context::reactor) {}

  void read() {
    if (!s_.open || s_.read_waiting || s_.in_read) return;
    s_.in_read = true;
    parse();  // frames left in the buffer when reading paused come first
    while (s_.open && !s_.read_paused()) {
      bool fds_complete = true;
      bool drained = false;
      const ssize_t n = s_.reader.receive(s_.socket.native_handle(), MSG_DONTWAIT,
                                          s_.options.max_frame_size, fds_complete, drained);
      if (n < 0 && errno == EINTR) continue;
      if (!received(n < 0 ? errno : 0, n, fds_complete, drained)) break;
    }
    finish_read();
  }

  // The reactor's own receive completed with `n` bytes in the reader's free
  // space (see wait_readable): file them, then read on as read() does.
  void read_after(error_code ec, std::size_t n, bool drained) {
    if (!s_.open || s_.in_read) return;
    s_.in_read = true;
    ssize_t got = static_cast<ssize_t>(n);
    int err = 0;
    if (ec == asio::error::eof) {
      got = 0;
    } else if (ec) {
      got = -1;
      err = ec.value();
    } else {
      s_.reader.commit(n);
    }
    const bool more = received(err, got, true, drained);
    s_.in_read = false;
    if (more) {
      read();
    } else {
      finish_read();
    }
  }

  void write() {
    while (s_.open && !s_.outbox.empty() && !s_.write_waiting) {
      std::array<iovec, max_iov> iov{};
      std::size_t count = 0;
      for (auto& f : s_.outbox) {
        // Descriptors go with the first byte of their frame: such a frame
        // always starts a sendmsg of its own.
        if (count == max_iov || (count > 0 && !f.fds.empty())) break;
        iov[count++] = {f.bytes.data() + f.offset, f.bytes.size() - f.offset};
      }
      auto& first = s_.outbox.front();
      const ssize_t n = detail::send_with_fds(
          s_.socket.native_handle(), std::span(iov.data(), count), first.fds, MSG_DONTWAIT);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
          wait_writable();
          break;
        }
        const int err = errno;
        // The peer went before this went out: what it sent first (a
        // server's refusal, sent before it read a byte of ours) may still
        // wait in the socket, and says why better than the close does.
        if (err == EPIPE || err == ECONNRESET) read_parting_words();
        fail(socket_error(err), salvage::yes);
        break;
      }
      first.fds.clear();  // they went with the first byte
      consume_written(static_cast<std::size_t>(n));
    }
    // Writing drained our replies below their limit: reading may go on.
    if (s_.open && !s_.read_paused()) read();
    s_.publish();
  }

  enum class salvage { no, yes };
  enum class notify { none, peer };

  // Closes the connection with `ec`. salvage::yes first hands whole frames
  // still in the buffer to the inbox (the peer sent them before it went);
  // notify::peer first tells the peer why, when that cannot split a frame.
  void fail(error_code ec, salvage keep = salvage::no, notify tell = notify::none) {
    if (!s_.open) return;
    // A copy a fork gave a child shares the socket with the parent, who still
    // uses it: the child only closes its descriptor (no frame, no notice, no
    // shutdown, all of which would reach the parent's peer).
    const bool forked_copy = s_.fork.forked_copy();
    if (forked_copy) {
      s_.frames_deferred = 0;
      tell = notify::none;
    }
    // Frames a handler queued in this read and not yet written: out first,
    // as they would be had they been written when queued.
    if (s_.frames_deferred > 0 && self_) {
      flush_deferred();
      if (!s_.open) return;
    }
    // A close reason is never success: receivers would take it for a frame.
    if (!ec) ec = make_error_code(errc::peer_closed);
    inline_ok_ = false;  // what fail completes is posted, whoever called it
    if (tell == notify::peer && (s_.outbox.empty() || s_.outbox.front().offset == 0)) {
      const auto notice = detail::encode_error_notice(ec);
      (void)::send(s_.socket.native_handle(), notice.data(), notice.size(),
                   MSG_DONTWAIT | MSG_NOSIGNAL);
    }
    if (keep == salvage::yes) {
      if (error_code why = salvage_frames()) ec = why;  // the peer said why it went
    }
    s_.open = false;
    s_.reason = ec;
    boost::system::error_code ignored;
    if (!forked_copy) s_.socket.shutdown(stream_socket::shutdown_both, ignored);
    s_.socket.close(ignored);
    s_.timer.cancel();
    s_.timer_key = connection::impl::timer_none;
    for (auto& [id, handler] : s_.calls) complete(std::move(handler), s_.strand, ec, frame{});
    s_.calls.clear();
    for (auto& f : s_.outbox) {
      if (f.done) complete(std::move(*f.done), s_.strand, ec);
    }
    s_.outbox.clear();
    s_.outbox_bytes = s_.outbox_reply_bytes = 0;
    // Frames already received stay in the inbox for async_receive; waiting
    // receivers exist only when the inbox is empty.
    while (!s_.receivers.empty() && !s_.inbox.empty()) deliver_to_receiver();
    for (auto& [id, handler] : s_.receivers) complete(std::move(handler), s_.strand, ec, frame{});
    s_.receivers.clear();
    s_.reader.pending_fds().clear();
    s_.publish();
  }

  // Writes the frames that handlers queued during this read (see enqueue).
  void flush_deferred() {
    if (s_.frames_deferred == 0) return;
    s_.frames_deferred = 0;
    write();
  }

  void deliver_to_receiver() {
    auto handler = std::move(s_.receivers.front().second);
    s_.receivers.pop_front();
    frame f = std::move(s_.inbox.front());
    s_.inbox.pop_front();
    finish(std::move(handler), error_code{}, std::move(f));
  }

 private:
  // Completes a handler that received a frame. Read from the socket's own
  // wake-up, a handler that runs on the strand (no executor of its own) is
  // called here and now: the application is not inside one of its calls, and
  // the hop through the scheduler would cost a reactor poll per frame. Its
  // calls back into the connection find `in_read` set and do not nest a read.
  template <class Handler, class... Args>
  void finish(pending_handler<Handler> p, Args... args) {
    if (inline_ok_ && !p.work) {
      std::move(p.handler)(std::move(args)...);
    } else {
      complete(std::move(p), s_.strand, std::move(args)...);
    }
  }

  // Files the outcome of one receive (`n` bytes, or -1 with `err`); returns
  // whether to read on. Waits, fails or stops otherwise.
  bool received(int err, ssize_t n, bool fds_complete, bool drained) {
    if (n < 0) {
      if (err == EAGAIN || err == EWOULDBLOCK) {
        wait_readable();
      } else {
        fail(socket_error(err), salvage::yes);
      }
      return false;
    }
    if (n == 0) {
      fail(make_error_code(s_.reader.empty() ? errc::peer_closed : errc::short_frame),
           salvage::yes);
      return false;
    }
    if (!fds_complete) {
      fail(make_error_code(errc::too_many_fds), salvage::no, notify::peer);
      return false;
    }
    parse();
    if (!s_.open || s_.read_paused()) return false;
    // A short read emptied the socket: wait instead of paying for an EAGAIN.
    if (drained) {
      wait_readable();
      return false;
    }
    return true;
  }

  void finish_read() {
    s_.in_read = false;
    flush_deferred();  // parse() has written them; this is only a backstop
    arm_timer();
    s_.publish();
  }

  // Whole frames the peer sent before it went: replies answer their calls,
  // the rest wait in the inbox whatever its limit (they are already in memory).
  // Returns the reason of a parting notice among them, if any.
  error_code salvage_frames() {
    error_code why;
    while (auto f = s_.reader.next(s_.options)) {
      if (!*f) break;
      frame& got = **f;
      if (got.kind == frame_kind::reply) {
        deliver(std::move(got));
      } else if (got.kind == frame_kind::notice && got.error && got.correlation_id == 0) {
        if (!why) why = detail::from_wire_error(*got.error, s_.options.error_categories);
      } else {
        s_.inbox.push_back(std::move(got));
      }
    }
    return why;
  }

  // Reads, without waiting, what the peer sent before it went (for fail's salvage).
  // Not while the reactor's own receive is pending (wait_readable, a peer that
  // sends no descriptors): it owns the reader's free space until it completes,
  // maybe on another thread, and a read here would write the same bytes (or,
  // growing the buffer, free them under it). Its completion finds the
  // connection closed; what it read is lost, as a close mid-read loses it.
  void read_parting_words() {
    if (s_.read_waiting && !s_.options.peer_sends_fds) return;
    for (int round = 0; round < 16; ++round) {
      bool fds_complete = true;
      bool drained = false;
      const ssize_t n = s_.reader.receive(s_.socket.native_handle(), MSG_DONTWAIT,
                                          s_.options.max_frame_size, fds_complete, drained);
      if (n <= 0 || !fds_complete || drained) return;
    }
  }

  // Hands every whole frame in the buffer over, then writes what their
  // handlers queued and enqueue held back: replies to a batch of requests, or
  // the calls that a batch of replies' handlers make, go out in one sendmsg
  // (descriptors allowing) instead of one each, which would pay a system call
  // and, most often, a wake-up of the peer for every frame.
  void parse() {
    for (;;) {
      s_.batch_started = false;
      while (s_.open && !s_.read_paused()) {
        auto f = s_.reader.next(s_.options);
        if (!f) break;
        if (!*f) return fail(f->error(), salvage::no, notify::peer);
        s_.any_frame_received = true;
        ++s_.counters.frames_received;
        deliver(std::move(**f));
      }
      const bool held_back = s_.frames_deferred > 0;
      flush_deferred();
      // Replies held back may be what paused the batch (max_queued_send_bytes):
      // written, they no longer hold it up.
      if (!held_back || !s_.open || s_.read_paused()) break;
    }
    if (!s_.open) return;
    // A peer that may not send descriptors is owed none, even by a frame
    // still arriving.
    const std::size_t owed = s_.options.peer_sends_fds ? s_.options.max_fds_per_frame : 0;
    if (!s_.read_paused() && s_.reader.has_unclaimed_fds(owed)) {
      fail(make_error_code(errc::bad_frame), salvage::no, notify::peer);
    }
  }

  void deliver(frame f) {
    if (f.kind == frame_kind::reply) {
      auto it = s_.calls.find(f.correlation_id);
      if (it == s_.calls.end()) {
        ++s_.counters.replies_dropped;
        return;
      }
      auto handler = std::move(it->second);
      s_.calls.erase(it);
      error_code ec;
      if (f.error) ec = detail::from_wire_error(*f.error, s_.options.error_categories);
      finish(std::move(handler), ec, std::move(f));
      return;
    }
    // A notice with an error and no correlation id is the peer saying why it
    // is about to drop us: that is the close reason, not a message.
    if (f.kind == frame_kind::notice && f.error && f.correlation_id == 0) {
      return fail(detail::from_wire_error(*f.error, s_.options.error_categories), salvage::no);
    }
    s_.inbox.push_back(std::move(f));
    if (!s_.receivers.empty()) deliver_to_receiver();
  }

  void consume_written(std::size_t n) {
    while (n > 0) {
      auto& f = s_.outbox.front();
      const std::size_t left = f.bytes.size() - f.offset;
      if (n < left) {
        f.offset += n;
        return;
      }
      n -= left;
      s_.outbox_bytes -= f.bytes.size();
      if (f.is_reply) s_.outbox_reply_bytes -= f.bytes.size();
      ++s_.counters.frames_sent;
      if (f.done) complete(std::move(*f.done), s_.strand, error_code{});
      s_.outbox.pop_front();
    }
  }

  // Waits for bytes. Asio tries a receive at once (speculatively) and again
  // after every readiness event (only a 0-byte receive stops it), so a wait
  // by receive costs a recv that fails with EAGAIN each time the socket is
  // empty; async_wait(wait_read) costs an EPOLL_CTL_MOD instead.
  //  - A peer that may send descriptors: an async_wait, then read()'s
  //    recvmsg takes the bytes with their SCM_RIGHTS. (A peek here cost an
  //    EAGAIN peek, then a second recv before the recvmsg: per wake-up peek +
  //    epoll_wait + peek + recvmsg, now epoll_ctl + epoll_wait + recvmsg.)
  //  - A peer that may not (peer_sends_fds false): the receive reads into
  //    the reader's free space itself, saving the recvmsg (a failing recv and
  //    a reading one, the same count as a wait and a recvmsg). Descriptors
  //    sent anyway are dropped by the kernel and the frame announcing them
  //    fails.
  // The free space stays put while the receive is pending: nothing touches
  // the reader until it completes (read_waiting keeps read() out).
  void wait_readable() {
    s_.read_waiting = true;
    // Weak: a connection nobody holds any more is destroyed (and closed)
    // instead of waiting for its peer forever.
    auto resume = [weak = std::weak_ptr(self_)](auto&& then) {
      return [weak, then](error_code ec, std::size_t n) {
        auto self = weak.lock();
        if (!self) return;
        auto& s = detail::connection_access::state(*self);
        s.read_waiting = false;
        if (ec == asio::error::operation_aborted || !s.open) return;
        if (s.fork.forked_copy()) {  // a wait the parent armed, run by a forked child
          engine(s, self).fail(asio::error::operation_aborted);
          return;
        }
        then(engine(s, self, context::reactor), ec, n);
      };
    };
    // A connection that has received nothing yet holds no buffer: its first
    // wait only waits, so an idle session costs none (see frame_reader::initial_size).
    if (!s_.options.peer_sends_fds && s_.reader.has_buffer()) {
      const auto room = s_.reader.space(s_.options.max_frame_size);
      s_.socket.async_receive(
          asio::buffer(room.data(), room.size()),
          asio::bind_executor(s_.strand,
                              resume([size = room.size()](engine e, error_code ec, std::size_t n) {
                                e.read_after(ec, n, n < size);
                              })));
      return;
    }
    s_.socket.async_wait(stream_socket::wait_read,
                         asio::bind_executor(s_.strand, [resume](error_code ec) {
                           // EOF and socket errors are read() to find, as recvmsg reports them.
                           resume([](engine e, error_code, std::size_t) { e.read(); })(ec, 0);
                         }));
  }

  void wait_writable() {
    s_.write_waiting = true;
    // Strong: unsent frames keep the connection until they are written.
    s_.socket.async_wait(
        stream_socket::wait_write, asio::bind_executor(s_.strand, [self = self_](error_code ec) {
          auto& s = detail::connection_access::state(*self);
          s.write_waiting = false;
          if (ec || !s.open) return;
          if (s.fork.forked_copy())  // the parent's frames are the parent's to send
            return engine(s, self).fail(asio::error::operation_aborted);
          engine(s, self).write();
        }));
  }

  // One timer serves both limits: the first frame after connecting, and the
  // rest of the frame now arriving. It guards one frame, named by its stream
  // offset; when that frame completes (or reading pauses with whole frames
  // waiting, which is our slowness, not the peer's) it is re-armed or stopped.
  void arm_timer() {
    using state = connection::impl;
    if (!s_.open) return;
    std::uint64_t key = state::timer_none;
    auto deadline = std::chrono::steady_clock::now();
    if (!s_.any_frame_received && s_.options.first_frame_timeout.count() > 0) {
      key = state::timer_first_frame;
      deadline = s_.opened_at + s_.options.first_frame_timeout;
    } else if (!s_.read_paused() && !s_.reader.empty() &&
               s_.options.partial_frame_timeout.count() > 0) {
      key = s_.reader.consumed();
      deadline += s_.options.partial_frame_timeout;
    }
    if (key == s_.timer_key) return;  // the same frame: keep its deadline
    s_.timer_key = key;
    const std::uint64_t generation = ++s_.timer_generation;
    if (key == state::timer_none) {
      s_.timer.cancel();
      return;
    }
    s_.timer.expires_at(deadline);
    s_.timer.async_wait([weak = std::weak_ptr(self_), generation](error_code ec) {
      auto self = weak.lock();
      if (ec || !self) return;
      auto& s = detail::connection_access::state(*self);
      if (generation != s.timer_generation || !s.open)
        return;  // re-armed after this expiry was queued
      s.timer_key = connection::impl::timer_none;
      engine(s, self).fail(make_error_code(errc::timed_out), salvage::no, notify::peer);
    });
  }

  connection::impl& s_;
  const std::shared_ptr<connection>& self_;
  bool inline_ok_;
};

}  // namespace

// --- connection ------------------------------------------------------------

connection::connection(std::unique_ptr<impl> p) : impl_(std::move(p)) {}

connection::~connection() {
  // The last reference went while the connection was open: nothing can wait
  // on it any more, but handlers it holds (calls in flight) still complete.
  engine(*impl_, nullptr).fail(asio::error::operation_aborted);
}

result<connection::pointer> connection::adopt(asio::io_context& ctx, unique_fd fd,
                                              connection_options options) {
  const int raw = fd.get();
  auto cred = detail::claim_unix_stream(raw);
  if (!cred) return cred.error();
  options.max_frame_size = std::min<std::size_t>(options.max_frame_size, INT32_MAX - 64);

  stream_socket socket(ctx);
  boost::system::error_code ec;
  socket.assign(asio::local::stream_protocol(), raw, ec);
  if (ec) return ec;
  fd.release();
  socket.non_blocking(true, ec);
  if (ec) return ec;
  auto state = std::make_unique<impl>(ctx, std::move(socket), std::move(options));
  state->peer = *cred;
  auto c = pointer(new connection(
      std::move(state)));  // NOLINT(cppcoreguidelines-owning-memory): private constructor
  c->impl_->registration.hold(c);
  asio::dispatch(c->impl_->strand, [self = c] { engine(*self->impl_, self).read(); });
  return c;
}

result<connection::pointer> connection::connect(asio::io_context& ctx, const std::string& path,
                                                connection_options options) {
  // Non-blocking: a listener whose backlog is full answers EAGAIN instead of
  // freezing the caller's loop.
  auto fd = detail::connect_unix(path);
  if (!fd) return fd.error();
  return adopt(ctx, std::move(*fd), std::move(options));
}

result<std::pair<connection::pointer, connection::pointer>> connection::pair(
    asio::io_context& ctx, connection_options options) {
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) return socket_error(errno);
  unique_fd a(fds[0]);
  unique_fd b(fds[1]);
  auto first = adopt(ctx, std::move(a), options);
  if (!first) return first.error();
  auto second = adopt(ctx, std::move(b), std::move(options));
  if (!second) return second.error();
  return std::pair{*first, *second};
}

void connection::start_send(frame f, send_handler handler) {
  error_code ec = detail::check_outgoing(f, impl_->options);
  const bool is_reply = f.kind == frame_kind::reply;
  result<std::string> encoded =
      ec ? result<std::string>(ec) : detail::encode_frame(f, impl_->options.max_frame_size);
  pending_handler<send_handler> pending(std::move(handler));
  asio::dispatch(
      impl_->strand, [self = shared_from_this(), encoded = std::move(encoded),
                      fds = std::move(f.fds), pending = std::move(pending), is_reply]() mutable {
        auto& s = *self->impl_;
        if (!encoded) return complete(std::move(pending), s.strand, encoded.error());
        if (!s.open) return complete(std::move(pending), s.strand, s.reason);
        self->enqueue({std::move(*encoded), 0, std::move(fds), std::move(pending), is_reply});
      });
}

error_code connection::send(frame f) {
  if (auto ec = detail::check_outgoing(f, impl_->options)) return ec;
  const bool is_reply = f.kind == frame_kind::reply;
  auto encoded = detail::encode_frame(f, impl_->options.max_frame_size);
  if (!encoded) return encoded.error();
  asio::dispatch(impl_->strand, [self = shared_from_this(), encoded = std::move(*encoded),
                                 fds = std::move(f.fds), is_reply]() mutable {
    if (!self->impl_->open) return;
    self->enqueue({std::move(encoded), 0, std::move(fds), std::nullopt, is_reply});
  });
  return {};
}

// On the strand, the connection open.
void connection::enqueue(outgoing_frame f) {
  auto& s = *impl_;
  s.outbox_bytes += f.bytes.size();
  if (f.is_reply) s.outbox_reply_bytes += f.bytes.size();
  s.outbox.push_back(std::move(f));
  // Queued by a handler that a read runs inline (a reply to a frame just
  // parsed): the first of the parse is written at once, the next ones wait to
  // go together (see connection::impl::batch_started), at most one sendmsg's
  // worth of them.
  if (s.in_read) {
    if (s.batch_started && ++s.frames_deferred < max_iov) return;
    s.batch_started = true;
    s.frames_deferred = 0;
  }
  engine(s, shared_from_this()).write();
}

void connection::start_call(frame f, frame_handler handler) {
  f.kind = frame_kind::request;
  f.correlation_id = impl_->next_correlation_id.fetch_add(1, std::memory_order_relaxed);
  // Per-call cancellation (e.g. a deadline through asio::cancel_after or an
  // awaitable operator||): the call is forgotten and completes aborted; a reply
  // that comes later is counted as dropped.
  auto slot = asio::get_associated_cancellation_slot(handler);
  if (slot.is_connected()) {
    slot.assign([weak = weak_from_this(), id = f.correlation_id](asio::cancellation_type) {
      auto self = weak.lock();
      if (!self) return;
      asio::dispatch(self->impl_->strand, [self, id] {
        auto& s = *self->impl_;
        auto it = s.calls.find(id);
        if (it == s.calls.end()) return;
        auto pending = std::move(it->second);
        s.calls.erase(it);
        complete(std::move(pending), s.strand, error_code(asio::error::operation_aborted), frame{});
        s.publish();
      });
    });
  }
  error_code ec = detail::check_outgoing(f, impl_->options);
  result<std::string> encoded =
      ec ? result<std::string>(ec) : detail::encode_frame(f, impl_->options.max_frame_size);
  pending_handler<frame_handler> pending(std::move(handler));
  asio::dispatch(impl_->strand,
                 [self = shared_from_this(), id = f.correlation_id, encoded = std::move(encoded),
                  fds = std::move(f.fds), pending = std::move(pending)]() mutable {
                   auto& s = *self->impl_;
                   if (!encoded)
                     return complete(std::move(pending), s.strand, encoded.error(), frame{});
                   if (!s.open) return complete(std::move(pending), s.strand, s.reason, frame{});
                   s.calls.emplace(id, std::move(pending));
                   self->enqueue({std::move(*encoded), 0, std::move(fds), std::nullopt, false});
                 });
}

void connection::start_receive(frame_handler handler) {
  const std::uint64_t id = impl_->next_receiver_id.fetch_add(1, std::memory_order_relaxed);
  auto slot = asio::get_associated_cancellation_slot(handler);
  if (slot.is_connected()) {
    slot.assign([weak = weak_from_this(), id](asio::cancellation_type) {
      auto self = weak.lock();
      if (!self) return;
      asio::dispatch(self->impl_->strand, [self, id] {
        auto& s = *self->impl_;
        auto it = std::find_if(s.receivers.begin(), s.receivers.end(),
                               [id](auto& r) { return r.first == id; });
        if (it == s.receivers.end()) return;  // already completed
        auto pending = std::move(it->second);
        s.receivers.erase(it);
        complete(std::move(pending), s.strand, error_code(asio::error::operation_aborted), frame{});
      });
    });
  }
  pending_handler<frame_handler> pending(std::move(handler));
  asio::dispatch(impl_->strand,
                 [self = shared_from_this(), pending = std::move(pending), id]() mutable {
                   auto& s = *self->impl_;
                   if (!s.inbox.empty()) {
                     frame f = std::move(s.inbox.front());
                     s.inbox.pop_front();
                     complete(std::move(pending), s.strand, error_code{}, std::move(f));
                     engine(s, self).read();  // resumes reading if the inbox limit had paused it
                     s.publish();
                     return;
                   }
                   if (!s.open) return complete(std::move(pending), s.strand, s.reason, frame{});
                   s.receivers.emplace_back(id, std::move(pending));
                 });
}

void connection::close() {
  // A forked child's copy closes its descriptor now: the child has one thread
  // (no strand to wait for), and its loop may never run again.
  if (impl_->fork.forked_copy()) {
    engine(*impl_, shared_from_this()).fail(asio::error::operation_aborted);
    return;
  }
  asio::dispatch(impl_->strand, [self = shared_from_this()] {
    engine(*self->impl_, self).fail(asio::error::operation_aborted);
  });
}

const peer_credentials& connection::peer() const noexcept { return impl_->peer; }

error_code connection::close_reason() const {
  std::lock_guard lock(impl_->published_mutex);
  return impl_->published_reason;
}

bool connection::is_open() const {
  std::lock_guard lock(impl_->published_mutex);
  return !impl_->published_reason;
}

connection_stats connection::stats() const {
  std::lock_guard lock(impl_->published_mutex);
  return impl_->published;
}

}  // namespace uipc
