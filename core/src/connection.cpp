// connection: the framed transport's state machine. Reads and writes go straight to
// recvmsg/sendmsg on the non-blocking socket (Asio has no SCM_RIGHTS); Asio only
// tells us when the socket is ready again. A callback state machine rather than
// a coroutine: the hot path (one frame in, one out) then costs no frame allocation.
#include "connection_state.hpp"
#include "wire.hpp"

#include <boost/asio/append.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/post.hpp>

#include <sys/socket.h>
#include <sys/un.h>
#include <fcntl.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <climits>
#include <cstring>

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
constexpr std::size_t max_fds_per_read = 64;

// The peer going away shows up as EOF, EPIPE or ECONNRESET: one code for all.
error_code socket_error(int e) {
  if (e == EPIPE || e == ECONNRESET) return make_error_code(errc::peer_closed);
  return {e, boost::system::system_category()};
}

// Completes a stored handler on its own executor (default: the strand), never
// inline. Its work guard goes with `p` once the post is queued: from then on the
// post itself keeps the handler's executor busy until the handler has run.
template <class Handler, class... Args>
void complete(pending_handler<Handler> p, const connection_strand& strand, Args... args) {
  asio::post(strand, asio::append(std::move(p.handler), std::move(args)...));
}

// What one connection does on its strand. `self_` is empty only when called
// from the destructor, which never starts a wait.
class engine {
 public:
  // `self` is the caller's reference: it outlives the engine, which is a
  // temporary on the stack, so holding it costs no reference count.
  engine(connection::impl& s, const std::shared_ptr<connection>& self) : s_(s), self_(self) {}

  void read() {
    if (!s_.open || s_.read_waiting || s_.in_read) return;
    s_.in_read = true;
    parse();  // frames left in the buffer when reading paused come first
    while (s_.open && !s_.read_paused()) {
      make_room();
      std::array<char, CMSG_SPACE(sizeof(int) * max_fds_per_read)> control{};
      iovec iov{s_.read_buffer.data() + s_.read_end, s_.read_buffer.size() - s_.read_end};
      msghdr msg{};
      msg.msg_iov = &iov;
      msg.msg_iovlen = 1;
      msg.msg_control = control.data();
      msg.msg_controllen = control.size();
      const ssize_t n = ::recvmsg(s_.socket.native_handle(), &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
          wait_readable();
          break;
        }
        fail(socket_error(errno), salvage::yes);
        break;
      }
      const bool fds_complete = take_fds(msg);
      if (n == 0) {
        fail(make_error_code(s_.read_end > s_.read_begin ? errc::short_frame : errc::peer_closed), salvage::yes);
        break;
      }
      if (!fds_complete) {
        fail(make_error_code(errc::too_many_fds), salvage::no, notify::peer);
        break;
      }
      const bool drained = static_cast<std::size_t>(n) < iov.iov_len;
      s_.read_end += static_cast<std::size_t>(n);
      parse();
      // A short read emptied the socket: wait instead of paying for an EAGAIN.
      if (drained && s_.open && !s_.read_paused()) {
        wait_readable();
        break;
      }
    }
    s_.in_read = false;
    shrink_buffer();
    arm_timer();
    s_.publish();
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
      msghdr msg{};
      msg.msg_iov = iov.data();
      msg.msg_iovlen = count;
      std::array<char, CMSG_SPACE(sizeof(int) * max_fds_per_read)> control{};
      auto& first = s_.outbox.front();
      if (!first.fds.empty()) {
        msg.msg_control = control.data();
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * first.fds.size());
        cmsghdr* c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * first.fds.size());
        auto* out = reinterpret_cast<int*>(CMSG_DATA(c));  // NOLINT: the cmsg layout is the kernel's
        for (std::size_t i = 0; i < first.fds.size(); ++i) out[i] = first.fds[i].get();
      }
      const ssize_t n = ::sendmsg(s_.socket.native_handle(), &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
          wait_writable();
          break;
        }
        fail(socket_error(errno), salvage::yes);
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
    if (tell == notify::peer && (s_.outbox.empty() || s_.outbox.front().offset == 0)) {
      const auto notice = detail::encode_error_notice(ec);
      (void)::send(s_.socket.native_handle(), notice.data(), notice.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
    }
    if (keep == salvage::yes) salvage_frames();
    s_.open = false;
    s_.reason = ec;
    boost::system::error_code ignored;
    s_.socket.shutdown(stream_socket::shutdown_both, ignored);
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
    s_.received_fds.clear();
    s_.publish();
  }

  void deliver_to_receiver() {
    auto handler = std::move(s_.receivers.front().second);
    s_.receivers.pop_front();
    frame f = std::move(s_.inbox.front());
    s_.inbox.pop_front();
    complete(std::move(handler), s_.strand, error_code{}, std::move(f));
  }

 private:
  // Whole frames the peer sent before it went: replies answer their calls,
  // the rest wait in the inbox whatever its limit (they are already in memory).
  void salvage_frames() {
    while (auto f = next_frame()) {
      if (!*f) return;
      frame& got = **f;
      if (got.kind == frame_kind::reply) {
        deliver(std::move(got));
      } else if (!(got.kind == frame_kind::notice && got.error && got.correlation_id == 0)) {
        s_.inbox.push_back(std::move(got));
      }
    }
  }

  // The next whole frame in the buffer: nullopt when none is complete, an
  // error_code inside when the bytes are bad.
  std::optional<result<frame>> next_frame() {
    const std::size_t have = s_.read_end - s_.read_begin;
    if (have < 4) return std::nullopt;
    const char* base = s_.read_buffer.data() + s_.read_begin;
    const std::size_t length = detail::read_prefix(base);
    if (length > s_.options.max_frame_size) return result<frame>(make_error_code(errc::frame_too_large));
    if (length == 0) return result<frame>(make_error_code(errc::bad_frame));
    if (have < 4 + length) return std::nullopt;
    auto f = detail::decode_frame(s_.decode_scratch, base + 4, length, s_.received_fds,
                                  s_.options.max_fds_per_frame);
    if (f) {
      s_.read_begin += 4 + length;
      s_.consumed_total += 4 + length;
    }
    return f;
  }

  void parse() {
    while (s_.open && !s_.read_paused()) {
      auto f = next_frame();
      if (!f) break;
      if (!*f) return fail(f->error(), salvage::no, notify::peer);
      s_.any_frame_received = true;
      ++s_.counters.frames_received;
      deliver(std::move(**f));
    }
    if (!s_.open) return;
    // Descriptors are claimed by the frame they came with. Once every whole
    // frame is parsed, only the frame still arriving may have some waiting, and
    // no more than one frame may carry: anything else was sent unannounced.
    const bool buffer_empty = s_.read_begin == s_.read_end;
    if (!s_.read_paused() && !s_.received_fds.empty() &&
        (buffer_empty || s_.received_fds.size() > s_.options.max_fds_per_frame)) {
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
      complete(std::move(handler), s_.strand, ec, std::move(f));
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

  void make_room() {
    auto& buf = s_.read_buffer;
    const std::size_t have = s_.read_end - s_.read_begin;
    if (have == 0) {
      s_.read_begin = s_.read_end = 0;
    } else if (s_.read_begin > 0 && buf.size() - s_.read_end < buf.size() / 4) {
      std::memmove(buf.data(), buf.data() + s_.read_begin, have);
      s_.read_begin = 0;
      s_.read_end = have;
    }
    if (s_.read_end < buf.size()) return;
    // Full: a frame larger than the buffer is arriving. Grow as its bytes come
    // (a bare prefix buys no allocation), never past the frame's own size.
    std::size_t limit = s_.options.max_frame_size + 4;
    if (have >= 4) limit = 4 + detail::read_prefix(buf.data() + s_.read_begin);
    if (s_.read_begin > 0) {
      std::memmove(buf.data(), buf.data() + s_.read_begin, have);
      s_.read_begin = 0;
      s_.read_end = have;
      return;
    }
    buf.resize(std::max(buf.size(), std::min(buf.size() * 2, limit)));
  }

  void shrink_buffer() {
    auto& buf = s_.read_buffer;
    if (s_.read_begin == s_.read_end && buf.size() > 4 * connection::impl::initial_read_buffer) {
      buf.resize(connection::impl::initial_read_buffer);
      buf.shrink_to_fit();
      s_.read_begin = s_.read_end = 0;
    }
  }

  // Returns false when the kernel had to drop descriptors (too many in one message).
  bool take_fds(msghdr& msg) {
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      const std::size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      const auto* in = reinterpret_cast<const int*>(CMSG_DATA(c));  // NOLINT: the cmsg layout is the kernel's
      for (std::size_t i = 0; i < n; ++i) s_.received_fds.emplace_back(in[i]);
    }
    return (msg.msg_flags & MSG_CTRUNC) == 0;
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

  void wait_readable() {
    s_.read_waiting = true;
    // Weak: a connection nobody holds any more is destroyed (and closed)
    // instead of waiting for its peer forever.
    s_.socket.async_wait(stream_socket::wait_read,
                         asio::bind_executor(s_.strand, [weak = std::weak_ptr(self_)](error_code ec) {
                           auto self = weak.lock();
                           if (!self) return;
                           auto& s = detail::connection_access::state(*self);
                           s.read_waiting = false;
                           if (ec || !s.open) return;
                           engine(s, self).read();
                         }));
  }

  void wait_writable() {
    s_.write_waiting = true;
    // Strong: unsent frames keep the connection until they are written.
    s_.socket.async_wait(stream_socket::wait_write,
                         asio::bind_executor(s_.strand, [self = self_](error_code ec) {
                           auto& s = detail::connection_access::state(*self);
                           s.write_waiting = false;
                           if (ec || !s.open) return;
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
    } else if (!s_.read_paused() && s_.read_end > s_.read_begin && s_.options.partial_frame_timeout.count() > 0) {
      key = s_.consumed_total;
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
      if (generation != s.timer_generation || !s.open) return;  // re-armed after this expiry was queued
      s.timer_key = connection::impl::timer_none;
      engine(s, self).fail(make_error_code(errc::timed_out), salvage::no, notify::peer);
    });
  }

  connection::impl& s_;
  const std::shared_ptr<connection>& self_;
};

// Local checks before a frame is queued: it fails alone, the connection stays.
error_code check_outgoing(const frame& f, const connection_options& options) {
  if (f.fds.size() > options.max_fds_per_frame || f.fds.size() > max_fds_per_read) {
    return make_error_code(errc::too_many_fds);
  }
  for (const auto& fd : f.fds) {
    if (!fd) return make_error_code(boost::system::errc::bad_file_descriptor);
  }
  return {};
}

}  // namespace

// --- connection ------------------------------------------------------------

connection::connection(std::unique_ptr<impl> p) : impl_(std::move(p)) {}

connection::~connection() {
  // The last reference went while the connection was open: nothing can wait
  // on it any more, but handlers it holds (calls in flight) still complete.
  engine(*impl_, nullptr).fail(asio::error::operation_aborted);
}

result<connection::pointer> connection::adopt(asio::io_context& ctx, unique_fd fd, connection_options options) {
  const int raw = fd.get();
  int domain = 0;
  int type = 0;
  socklen_t len = sizeof domain;
  if (::getsockopt(raw, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0) return socket_error(errno);
  len = sizeof type;
  if (::getsockopt(raw, SOL_SOCKET, SO_TYPE, &type, &len) != 0) return socket_error(errno);
  if (domain != AF_UNIX || type != SOCK_STREAM) return make_error_code(boost::system::errc::invalid_argument);
  // Credentials fail closed: without them there is no connection.
  ucred cred{};
  len = sizeof cred;
  if (::getsockopt(raw, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return socket_error(errno);
  // Accepted sockets do not inherit close-on-exec: a child must never get them.
  if (::fcntl(raw, F_SETFD, FD_CLOEXEC) != 0) return socket_error(errno);
  options.max_frame_size = std::min<std::size_t>(options.max_frame_size, INT32_MAX - 64);

  stream_socket socket(ctx);
  boost::system::error_code ec;
  socket.assign(asio::local::stream_protocol(), raw, ec);
  if (ec) return ec;
  fd.release();
  socket.non_blocking(true, ec);
  if (ec) return ec;
  auto state = std::make_unique<impl>(ctx, std::move(socket), std::move(options));
  state->peer = {cred.pid, cred.uid, cred.gid};
  auto c = pointer(new connection(std::move(state)));  // NOLINT(cppcoreguidelines-owning-memory): private constructor
  asio::dispatch(c->impl_->strand, [self = c] { engine(*self->impl_, self).read(); });
  return c;
}

result<connection::pointer> connection::connect(asio::io_context& ctx, const std::string& path,
                                                connection_options options) {
  sockaddr_un addr{};
  if (path.empty() || path.size() >= sizeof addr.sun_path) return socket_error(ENAMETOOLONG);
  // Non-blocking: a listener whose backlog is full answers EAGAIN instead of
  // freezing the caller's loop.
  unique_fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) return socket_error(errno);
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), path.size());
  int rc;
  do {
    rc = ::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr);  // NOLINT: sockets API
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) return socket_error(errno);
  return adopt(ctx, std::move(fd), std::move(options));
}

result<std::pair<connection::pointer, connection::pointer>> connection::pair(asio::io_context& ctx,
                                                                              connection_options options) {
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
  error_code ec = check_outgoing(f, impl_->options);
  const bool is_reply = f.kind == frame_kind::reply;
  result<std::string> encoded = ec ? result<std::string>(ec) : detail::encode_frame(f, impl_->options.max_frame_size);
  pending_handler<send_handler> pending(std::move(handler));
  asio::dispatch(impl_->strand, [self = shared_from_this(), encoded = std::move(encoded), fds = std::move(f.fds),
                                 pending = std::move(pending), is_reply]() mutable {
    auto& s = *self->impl_;
    if (!encoded) return complete(std::move(pending), s.strand, encoded.error());
    if (!s.open) return complete(std::move(pending), s.strand, s.reason);
    s.outbox_bytes += encoded->size();
    if (is_reply) s.outbox_reply_bytes += encoded->size();
    s.outbox.push_back({std::move(*encoded), 0, std::move(fds), std::move(pending), is_reply});
    engine(s, self).write();
  });
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
  error_code ec = check_outgoing(f, impl_->options);
  result<std::string> encoded = ec ? result<std::string>(ec) : detail::encode_frame(f, impl_->options.max_frame_size);
  pending_handler<frame_handler> pending(std::move(handler));
  asio::dispatch(impl_->strand, [self = shared_from_this(), id = f.correlation_id, encoded = std::move(encoded),
                                 fds = std::move(f.fds), pending = std::move(pending)]() mutable {
    auto& s = *self->impl_;
    if (!encoded) return complete(std::move(pending), s.strand, encoded.error(), frame{});
    if (!s.open) return complete(std::move(pending), s.strand, s.reason, frame{});
    s.calls.emplace(id, std::move(pending));
    s.outbox_bytes += encoded->size();
    s.outbox.push_back({std::move(*encoded), 0, std::move(fds), std::nullopt, false});
    engine(s, self).write();
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
        auto it = std::find_if(s.receivers.begin(), s.receivers.end(), [id](auto& r) { return r.first == id; });
        if (it == s.receivers.end()) return;  // already completed
        auto pending = std::move(it->second);
        s.receivers.erase(it);
        complete(std::move(pending), s.strand, error_code(asio::error::operation_aborted), frame{});
      });
    });
  }
  pending_handler<frame_handler> pending(std::move(handler));
  asio::dispatch(impl_->strand, [self = shared_from_this(), pending = std::move(pending), id]() mutable {
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
