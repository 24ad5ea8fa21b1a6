// connection: the framed transport's state machine. Reads and writes go straight to
// recvmsg/sendmsg on the non-blocking socket (Asio has no SCM_RIGHTS); Asio only
// tells us when the socket is ready again.
#include "uipc/core/framed.hpp"

#include "uipc/proto/envelope.pb.h"
#include "wire.hpp"

#include <boost/asio/append.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>

#include <sys/socket.h>
#include <sys/un.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <deque>
#include <mutex>
#include <unordered_map>

namespace uipc {

namespace asio = boost::asio;
using stream_socket = asio::local::stream_protocol::socket;

namespace {

constexpr std::size_t initial_read_buffer = 64 * 1024;
constexpr std::size_t max_iov = 64;

error_code last_error() { return {errno, boost::system::system_category()}; }

// Completes `handler` on its associated executor (default: `fallback`), never inline.
template <class Handler, class Executor, class... Args>
void post_completion(Handler handler, const Executor& fallback, Args... args) {
  asio::post(fallback, asio::append(std::move(handler), std::move(args)...));
}

}  // namespace

struct outgoing_frame {
  std::string bytes;  // prefix + envelope
  std::size_t offset = 0;
  std::vector<unique_fd> fds;  // sent with the frame's first byte
  connection::send_handler done;
};

struct connection::impl {
  impl(asio::io_context& ctx, stream_socket s, connection_options o)
      : strand(asio::make_strand(ctx)), socket(std::move(s)), options(std::move(o)), timer(strand) {
    read_buffer.resize(initial_read_buffer);
  }

  asio::strand<asio::io_context::executor_type> strand;
  stream_socket socket;
  connection_options options;
  peer_credentials peer;
  asio::steady_timer timer;
  std::chrono::steady_clock::time_point opened_at = std::chrono::steady_clock::now();

  // State below is touched on the strand only, except what `stats_mutex` guards.
  mutable std::mutex stats_mutex;
  bool open = true;
  error_code reason;
  connection_stats counters;

  std::vector<char> read_buffer;
  std::size_t read_begin = 0;  // first unparsed byte
  std::size_t read_end = 0;    // one past the last received byte
  std::deque<unique_fd> received_fds;
  bool read_waiting = false;  // an async_wait(wait_read) is pending
  bool in_read = false;
  bool any_frame_received = false;
  enum class timer_use { none, first_frame, partial_frame };
  timer_use timer_armed_for = timer_use::none;

  std::deque<frame> inbox;
  std::deque<frame_handler> receivers;
  std::unordered_map<std::uint64_t, frame_handler> calls;
  std::uint64_t next_correlation_id = 1;

  std::deque<outgoing_frame> outbox;
  std::size_t outbox_bytes = 0;
  bool write_waiting = false;

  proto::Envelope decode_scratch;

  bool read_paused() const {
    return inbox.size() >= options.max_queued_frames || outbox_bytes > options.max_queued_send_bytes;
  }
  void update_counters() {
    std::lock_guard lock(stats_mutex);
    counters.queued_frames = inbox.size();
    counters.queued_send_bytes = outbox_bytes;
    counters.calls_in_flight = calls.size();
  }
};

namespace detail {
struct connection_access {
  static connection::impl* state(connection& c) noexcept { return c.impl_.get(); }
};
}  // namespace detail

namespace {

// What one connection does on its strand. Free functions over impl plus the
// owning shared_ptr, so every pending operation keeps the connection alive.
class engine {
 public:
  engine(connection::impl& s, std::shared_ptr<connection> self) : s_(s), self_(std::move(self)) {}

  void read() {
    if (!s_.open || s_.read_waiting || s_.in_read) return;
    s_.in_read = true;
    parse();  // frames left in the buffer when reading paused come first
    for (;;) {
      if (!s_.open || s_.read_paused()) break;
      make_room();
      std::array<char, CMSG_SPACE(sizeof(int) * 64)> control{};
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
        fail(last_error());
        break;
      }
      const bool fds_ok = take_fds(msg);
      if (n == 0) {
        fail(make_error_code(s_.read_end > s_.read_begin ? errc::short_frame : errc::peer_closed));
        break;
      }
      if (!fds_ok) {
        fail(make_error_code(errc::too_many_fds), true);
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
    s_.update_counters();
    arm_timer();
  }

  void write() {
    while (s_.open && !s_.outbox.empty() && !s_.write_waiting) {
      std::array<iovec, max_iov> iov{};
      std::size_t count = 0;
      for (auto& f : s_.outbox) {
        if (count == max_iov || (count > 0 && !f.fds.empty())) break;
        iov[count++] = {f.bytes.data() + f.offset, f.bytes.size() - f.offset};
      }
      msghdr msg{};
      msg.msg_iov = iov.data();
      msg.msg_iovlen = count;
      std::vector<char> control;
      auto& first = s_.outbox.front();
      if (!first.fds.empty()) {
        control.resize(CMSG_SPACE(sizeof(int) * first.fds.size()));
        msg.msg_control = control.data();
        msg.msg_controllen = control.size();
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
        fail(last_error());
        break;
      }
      first.fds.clear();  // they went with the first byte
      consume_written(static_cast<std::size_t>(n));
    }
    s_.update_counters();
    // Writing drained the queue below its limit: reading may go on.
    if (s_.open && !s_.read_paused()) read();
  }

  void deliver(frame f) {
    {
      std::lock_guard lock(s_.stats_mutex);
      ++s_.counters.frames_received;
    }
    if (f.kind == frame_kind::reply) {
      auto it = s_.calls.find(f.correlation_id);
      if (it == s_.calls.end()) {
        std::lock_guard lock(s_.stats_mutex);
        ++s_.counters.replies_dropped;
        return;
      }
      auto handler = std::move(it->second);
      s_.calls.erase(it);
      error_code ec;
      if (f.error) ec = detail::from_wire_error(*f.error, s_.options.error_categories);
      post_completion(std::move(handler), s_.strand, ec, std::move(f));
      return;
    }
    if (!s_.receivers.empty()) {
      auto handler = std::move(s_.receivers.front());
      s_.receivers.pop_front();
      post_completion(std::move(handler), s_.strand, error_code{}, std::move(f));
      return;
    }
    s_.inbox.push_back(std::move(f));
  }

  // Closes the connection with `ec`. With `tell_peer`, first tries once to send
  // the peer a notice saying why (best effort: the socket may be full).
  void fail(error_code ec, bool tell_peer = false) {
    if (!s_.open) return;
    if (tell_peer) {
      auto notice = detail::encode_error_notice(ec);
      (void)::send(s_.socket.native_handle(), notice.data(), notice.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
    }
    s_.open = false;
    {
      std::lock_guard lock(s_.stats_mutex);
      s_.reason = ec;
    }
    boost::system::error_code ignored;
    s_.socket.shutdown(stream_socket::shutdown_both, ignored);
    s_.socket.close(ignored);
    s_.timer.cancel();
    s_.timer_armed_for = connection::impl::timer_use::none;
    for (auto& [id, handler] : s_.calls) post_completion(std::move(handler), s_.strand, ec, frame{});
    s_.calls.clear();
    for (auto& f : s_.outbox) {
      if (f.done) post_completion(std::move(f.done), s_.strand, ec);
    }
    s_.outbox.clear();
    s_.outbox_bytes = 0;
    // Frames already received stay in the inbox for async_receive; waiting
    // receivers exist only when the inbox is empty.
    for (auto& handler : s_.receivers) post_completion(std::move(handler), s_.strand, ec, frame{});
    s_.receivers.clear();
    s_.received_fds.clear();
    s_.update_counters();
  }

 private:
  void make_room() {
    auto& buf = s_.read_buffer;
    if (s_.read_begin == s_.read_end) {
      s_.read_begin = s_.read_end = 0;
    } else if (s_.read_begin > 0 && buf.size() - s_.read_end < buf.size() / 4) {
      std::memmove(buf.data(), buf.data() + s_.read_begin, s_.read_end - s_.read_begin);
      s_.read_end -= s_.read_begin;
      s_.read_begin = 0;
    }
    // A frame larger than the buffer: grow to hold it whole (bounded by parse()).
    const std::size_t have = s_.read_end - s_.read_begin;
    if (have >= 4) {
      const std::size_t need = 4 + detail::read_prefix(buf.data() + s_.read_begin);
      if (s_.read_begin + need > buf.size()) {
        std::memmove(buf.data(), buf.data() + s_.read_begin, have);
        s_.read_begin = 0;
        s_.read_end = have;
        if (need > buf.size()) buf.resize(need);
      }
    }
    if (s_.read_end == buf.size()) buf.resize(buf.size() * 2);
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

  void parse() {
    while (s_.open && !s_.read_paused()) {
      const std::size_t have = s_.read_end - s_.read_begin;
      if (have < 4) return;
      const char* base = s_.read_buffer.data() + s_.read_begin;
      const std::size_t length = detail::read_prefix(base);
      if (length > s_.options.max_frame_size) return fail(make_error_code(errc::frame_too_large), true);
      if (length == 0) return fail(make_error_code(errc::bad_frame), true);
      if (have < 4 + length) return;
      auto f = detail::decode_frame(s_.decode_scratch, base + 4, length, s_.received_fds,
                                    s_.options.max_fds_per_frame);
      if (!f) return fail(f.error(), true);
      s_.read_begin += 4 + length;
      s_.any_frame_received = true;
      deliver(std::move(*f));
    }
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
      {
        std::lock_guard lock(s_.stats_mutex);
        ++s_.counters.frames_sent;
      }
      if (f.done) post_completion(std::move(f.done), s_.strand, error_code{});
      s_.outbox.pop_front();
    }
  }

  void wait_readable() {
    s_.read_waiting = true;
    s_.socket.async_wait(stream_socket::wait_read,
                         // Weak: a connection nobody holds any more is destroyed
                         // (and closed) instead of waiting for its peer forever.
                         asio::bind_executor(s_.strand, [weak = std::weak_ptr(self_)](error_code ec) {
                           auto self = weak.lock();
                           if (!self) return;
                           auto& s = *detail::connection_access::state(*self);
                           s.read_waiting = false;
                           if (ec || !s.open) return;
                           engine(s, self).read();
                         }));
  }

  void wait_writable() {
    s_.write_waiting = true;
    s_.socket.async_wait(stream_socket::wait_write,
                         // Strong: unsent frames keep the connection until written.
                         asio::bind_executor(s_.strand, [self = self_](error_code ec) {
                           auto& s = *detail::connection_access::state(*self);
                           s.write_waiting = false;
                           if (ec || !s.open) return;
                           engine(s, self).write();
                         }));
  }

  // One timer serves both limits: the first frame after connecting, and the
  // rest of a frame once it has begun.
  void arm_timer() {
    using use = connection::impl::timer_use;
    if (!s_.open) return;
    use wanted = use::none;
    auto deadline = std::chrono::steady_clock::time_point::max();
    if (!s_.any_frame_received && s_.options.first_frame_timeout.count() > 0) {
      wanted = use::first_frame;
      deadline = s_.opened_at + s_.options.first_frame_timeout;
    } else if (s_.read_end > s_.read_begin && s_.options.partial_frame_timeout.count() > 0) {
      wanted = use::partial_frame;
      deadline = std::chrono::steady_clock::now() + s_.options.partial_frame_timeout;
    }
    if (wanted == s_.timer_armed_for) return;  // keeps the deadline of the frame that began first
    s_.timer_armed_for = wanted;
    if (wanted == use::none) {
      s_.timer.cancel();
      return;
    }
    s_.timer.expires_at(deadline);
    s_.timer.async_wait([weak = std::weak_ptr(self_)](error_code ec) {
      auto self = weak.lock();
      if (ec || !self) return;  // re-armed, cancelled, or the connection is gone
      auto& s = *detail::connection_access::state(*self);
      s.timer_armed_for = use::none;
      // Re-check: the frame may have completed after the timer expired.
      const bool waiting_first = !s.any_frame_received && s.options.first_frame_timeout.count() > 0;
      const bool partial = s.read_end > s.read_begin && s.options.partial_frame_timeout.count() > 0;
      if (waiting_first || partial) engine(s, self).fail(make_error_code(errc::timed_out), true);
    });
  }

  connection::impl& s_;
  std::shared_ptr<connection> self_;
};

}  // namespace

// --- connection ------------------------------------------------------------

connection::connection(std::unique_ptr<impl> p) : impl_(std::move(p)) {}

connection::~connection() {
  // The last reference went while the connection was open: nothing can wait
  // on it any more, but handlers it holds (calls in flight) still complete.
  engine(*impl_, nullptr).fail(asio::error::operation_aborted);
}

void connection::start() {
  ucred cred{};
  socklen_t len = sizeof cred;
  if (::getsockopt(impl_->socket.native_handle(), SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0) {
    impl_->peer = {cred.pid, cred.uid, cred.gid};
  }
  boost::system::error_code ignored;
  impl_->socket.non_blocking(true, ignored);
  asio::dispatch(impl_->strand, [self = shared_from_this()] {
    engine e(*self->impl_, self);
    e.read();
  });
}

result<connection::pointer> connection::adopt(asio::io_context& ctx, unique_fd fd, connection_options options) {
  stream_socket socket(ctx);
  boost::system::error_code ec;
  socket.assign(asio::local::stream_protocol(), fd.get(), ec);
  if (ec) return ec;
  fd.release();
  auto c = pointer(new connection(std::make_unique<impl>(ctx, std::move(socket), std::move(options))));
  c->start();
  return c;
}

result<connection::pointer> connection::connect(asio::io_context& ctx, const std::string& path,
                                                connection_options options) {
  sockaddr_un addr{};
  if (path.size() >= sizeof addr.sun_path) return error_code(ENAMETOOLONG, boost::system::system_category());
  unique_fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return last_error();
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), path.size());
  int rc;
  do {
    rc = ::connect(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr);  // NOLINT: sockets API
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) return last_error();
  return adopt(ctx, std::move(fd), std::move(options));
}

result<std::pair<connection::pointer, connection::pointer>> connection::pair(asio::io_context& ctx,
                                                                              connection_options options) {
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) return last_error();
  unique_fd a(fds[0]);
  unique_fd b(fds[1]);
  auto first = adopt(ctx, std::move(a), options);
  if (!first) return first.error();
  auto second = adopt(ctx, std::move(b), std::move(options));
  if (!second) return second.error();
  return std::pair{*first, *second};
}

void connection::start_send(frame f, send_handler handler) {
  auto encoded = detail::encode_frame(f, impl_->options.max_frame_size);
  asio::dispatch(impl_->strand, [self = shared_from_this(), encoded = std::move(encoded), fds = std::move(f.fds),
                                 handler = std::move(handler)]() mutable {
    auto& s = *self->impl_;
    if (!encoded) return post_completion(std::move(handler), s.strand, encoded.error());
    if (!s.open) return post_completion(std::move(handler), s.strand, s.reason);
    s.outbox_bytes += encoded->size();
    s.outbox.push_back({std::move(*encoded), 0, std::move(fds), std::move(handler)});
    engine(s, self).write();
  });
}

void connection::start_call(frame f, frame_handler handler) {
  f.kind = frame_kind::request;
  asio::dispatch(impl_->strand, [self = shared_from_this(), f = std::move(f), handler = std::move(handler)]() mutable {
    auto& s = *self->impl_;
    if (!s.open) return post_completion(std::move(handler), s.strand, s.reason, frame{});
    f.correlation_id = s.next_correlation_id++;
    auto encoded = detail::encode_frame(f, s.options.max_frame_size);
    if (!encoded) return post_completion(std::move(handler), s.strand, encoded.error(), frame{});
    s.calls.emplace(f.correlation_id, std::move(handler));
    s.outbox_bytes += encoded->size();
    s.outbox.push_back({std::move(*encoded), 0, std::move(f.fds), {}});
    engine(s, self).write();
  });
}

void connection::start_receive(frame_handler handler) {
  asio::dispatch(impl_->strand, [self = shared_from_this(), handler = std::move(handler)]() mutable {
    auto& s = *self->impl_;
    if (!s.inbox.empty()) {
      frame f = std::move(s.inbox.front());
      s.inbox.pop_front();
      post_completion(std::move(handler), s.strand, error_code{}, std::move(f));
      engine(s, self).read();  // resumes reading if the inbox limit had paused it
      s.update_counters();
      return;
    }
    if (!s.open) return post_completion(std::move(handler), s.strand, s.reason, frame{});
    s.receivers.push_back(std::move(handler));
  });
}

void connection::close() {
  asio::dispatch(impl_->strand, [self = shared_from_this()] {
    engine(*self->impl_, self).fail(asio::error::operation_aborted);
  });
}

const peer_credentials& connection::peer() const noexcept { return impl_->peer; }

error_code connection::close_reason() const {
  std::lock_guard lock(impl_->stats_mutex);
  return impl_->reason;
}

bool connection::is_open() const {
  std::lock_guard lock(impl_->stats_mutex);
  return !impl_->reason;
}

connection_stats connection::stats() const {
  std::lock_guard lock(impl_->stats_mutex);
  return impl_->counters;
}

}  // namespace uipc
