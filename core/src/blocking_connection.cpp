// blocking_connection: framing driven by the calling thread. The socket is
// blocking, and a deadline becomes SO_RCVTIMEO/SO_SNDTIMEO, set only when it
// moves enough to matter: a steady stream of calls with the same timeout pays
// one recvmsg and one sendmsg each, as a hand-written client would.
#include "uipc/core/blocking_connection.hpp"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/time.h>

#include <atomic>
#include <boost/asio/error.hpp>
#include <cerrno>
#include <climits>
#include <deque>
#include <mutex>

#include "frame_io.hpp"
#include "wire.hpp"

namespace uipc {

using clock = blocking_connection::clock;

struct blocking_connection::impl {
  unique_fd fd;
  connection_options options;
  peer_credentials peer;
  std::atomic<bool> closing{false};

  // Everything below is touched under `mutex`, by one operation at a time.
  std::mutex mutex;
  bool open = true;
  detail::frame_reader reader;
  std::deque<frame> inbox;
  std::uint64_t next_correlation_id = 1;
  std::uint64_t awaited_id = 0;  // the call in progress, if any
  std::optional<result<frame>> reply;
  std::chrono::nanoseconds receive_timeout{0};  // as set on the socket (0: never set)
  std::chrono::nanoseconds send_timeout{0};

  connection_stats counters;

  // Published for other threads, which must not wait behind a blocked call.
  mutable std::mutex published_mutex;
  error_code reason;
  connection_stats published;

  // Makes the socket give up no later than `deadline` (and not much earlier):
  // false once the deadline has passed.
  bool arm(int option, std::chrono::nanoseconds& current, clock::time_point deadline) {
    const auto left = deadline - clock::now();
    if (left <= clock::duration::zero()) return false;
    // Within a millisecond late, or at most half early (a wake-up to look at
    // the clock again), the old setting will do.
    if (current > std::chrono::nanoseconds::zero() &&
        current <= left + std::chrono::milliseconds(1) && current >= left / 2) {
      return true;
    }
    const auto us =
        std::max<std::int64_t>(1, std::chrono::ceil<std::chrono::microseconds>(left).count());
    timeval tv{static_cast<time_t>(us / 1'000'000), static_cast<suseconds_t>(us % 1'000'000)};
    if (::setsockopt(fd.get(), SOL_SOCKET, option, &tv, sizeof tv) == 0)
      current = std::chrono::microseconds(us);
    return true;
  }

  void publish() {
    counters.queued_frames = inbox.size();
    counters.calls_in_flight = awaited_id != 0 ? 1 : 0;
    std::lock_guard lock(published_mutex);
    published = counters;
  }

  void fail(error_code ec, bool tell_peer = false) {
    if (!open) return;
    // Every frame goes out whole or the connection fails, so a notice here
    // never splits one.
    if (tell_peer && !closing.load()) {
      const auto notice = detail::encode_error_notice(ec);
      (void)::send(fd.get(), notice.data(), notice.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
    }
    if (closing.load()) ec = boost::asio::error::operation_aborted;
    open = false;
    ::shutdown(fd.get(), SHUT_RDWR);
    reader.pending_fds().clear();
    std::lock_guard lock(published_mutex);
    reason = ec;
  }

  error_code closed_reason() const {
    std::lock_guard lock(published_mutex);
    return reason;
  }

  // Writes all of `bytes`, the descriptors with the first byte. A deadline
  // before the first byte fails the frame alone; after it, the stream is
  // mid-frame and the connection goes.
  error_code write(const std::string& bytes, const std::vector<unique_fd>& fds,
                   clock::time_point deadline) {
    std::size_t offset = 0;
    while (offset < bytes.size()) {
      if (!arm(SO_SNDTIMEO, send_timeout, deadline)) {
        if (offset == 0) return make_error_code(errc::timed_out);
        fail(make_error_code(errc::timed_out));
        return closed_reason();
      }
      const iovec iov{const_cast<char*>(bytes.data() + offset),
                      bytes.size() - offset};  // NOLINT: not written
      const ssize_t n =
          detail::send_with_fds(fd.get(), std::span(&iov, 1),
                                offset == 0 ? std::span(fds) : std::span<const unique_fd>(), 0);
      if (n < 0) {
        if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
        const int err = errno;
        if (err == EPIPE || err == ECONNRESET) read_parting_words();
        fail(detail::socket_error(err));  // kept if the peer said why it went
        return closed_reason();
      }
      offset += static_cast<std::size_t>(n);
    }
    ++counters.frames_sent;
    return {};
  }

  // The peer closed before our frame went out: what it sent before it went
  // (a server's refusal, sent before it read a byte of ours) may still wait
  // in our socket, and says why better than the close does. Reads what is
  // there, without waiting, and files it; a notice fails the connection
  // with its reason.
  void read_parting_words() {
    for (int round = 0; round < 16 && open; ++round) {
      bool fds_complete = true;
      bool drained = false;
      const ssize_t n =
          reader.receive(fd.get(), MSG_DONTWAIT, options.max_frame_size, fds_complete, drained);
      if (n <= 0 || !fds_complete) return;
      while (open) {
        auto f = reader.next(options);
        if (!f || !*f) return;
        take(std::move(**f));
      }
    }
  }

  // Files one frame from the peer: the awaited reply, a stray reply, the
  // peer's close reason, or the inbox.
  void take(frame f) {
    ++counters.frames_received;
    if (f.kind == frame_kind::reply) {
      if (awaited_id == 0 || f.correlation_id != awaited_id) {
        ++counters.replies_dropped;
        return;
      }
      awaited_id = 0;
      if (f.error) {
        reply.emplace(detail::from_wire_error(*f.error, options.error_categories));
      } else {
        reply.emplace(std::move(f));
      }
      return;
    }
    if (f.kind == frame_kind::notice && f.error && f.correlation_id == 0) {
      return fail(detail::from_wire_error(*f.error, options.error_categories));
    }
    if (inbox.size() >= options.max_queued_frames) {
      // A blocking client reads to find its replies, so it cannot push back
      // by not reading: a peer that floods it unasked is dropped.
      return fail(make_error_code(boost::system::errc::no_buffer_space), true);
    }
    inbox.push_back(std::move(f));
  }

  // Reads until `done()` or the deadline. Errors: the close reason, or
  // errc::timed_out (the connection stays open).
  template <class Done>
  error_code pump(Done done, clock::time_point deadline) {
    for (;;) {
      while (open) {
        auto f = reader.next(options);
        if (!f) break;
        if (!*f) {
          fail(f->error(), true);
          break;
        }
        take(std::move(**f));
      }
      if (!open) return closed_reason();
      if (reader.has_unclaimed_fds(options.max_fds_per_frame)) {
        fail(make_error_code(errc::bad_frame), true);
        return closed_reason();
      }
      if (done()) return {};
      if (!arm(SO_RCVTIMEO, receive_timeout, deadline)) return make_error_code(errc::timed_out);
      bool fds_complete = true;
      bool drained = false;
      const ssize_t n = reader.receive(fd.get(), 0, options.max_frame_size, fds_complete, drained);
      if (n < 0) {
        if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
        fail(detail::socket_error(errno));
        return closed_reason();
      }
      if (n == 0) {
        fail(make_error_code(reader.empty() ? errc::peer_closed : errc::short_frame));
        return closed_reason();
      }
      if (!fds_complete) {
        fail(make_error_code(errc::too_many_fds), true);
        return closed_reason();
      }
    }
  }
};

result<blocking_connection> blocking_connection::connect(const std::string& path,
                                                         connection_options options) {
  auto fd = detail::connect_unix(path);
  if (!fd) return fd.error();
  return adopt(std::move(*fd), std::move(options));
}

result<blocking_connection> blocking_connection::adopt(unique_fd socket,
                                                       connection_options options) {
  const int raw = socket.get();
  auto cred = detail::claim_unix_stream(raw);
  if (!cred) return cred.error();
  const int flags = ::fcntl(raw, F_GETFL);
  if (flags < 0 || ::fcntl(raw, F_SETFL, flags & ~O_NONBLOCK) != 0)
    return detail::socket_error(errno);
  auto state = std::make_unique<impl>();
  state->fd = std::move(socket);
  options.max_frame_size = std::min<std::size_t>(options.max_frame_size, INT32_MAX - 64);
  state->options = std::move(options);
  state->peer = *cred;
  return blocking_connection(std::move(state));
}

blocking_connection::blocking_connection(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
blocking_connection::blocking_connection(blocking_connection&&) noexcept = default;
blocking_connection& blocking_connection::operator=(blocking_connection&&) noexcept = default;
blocking_connection::~blocking_connection() = default;

result<frame> blocking_connection::call(frame request, clock::time_point deadline) {
  auto& s = *impl_;
  std::lock_guard lock(s.mutex);
  if (!s.open) return s.closed_reason();
  if (auto ec = detail::check_outgoing(request, s.options)) return ec;
  request.kind = frame_kind::request;
  request.correlation_id = s.next_correlation_id++;
  auto bytes = detail::encode_frame(request, s.options.max_frame_size);
  if (!bytes) return bytes.error();
  if (auto ec = s.write(*bytes, request.fds, deadline)) return ec;
  s.awaited_id = request.correlation_id;
  s.reply.reset();
  const error_code ec = s.pump([&s] { return s.reply.has_value(); }, deadline);
  s.awaited_id = 0;  // a reply after the deadline is a stray one
  s.publish();
  if (ec) return ec;
  auto out = std::move(*s.reply);
  s.reply.reset();
  return out;
}

error_code blocking_connection::send(frame f, clock::time_point deadline) {
  auto& s = *impl_;
  std::lock_guard lock(s.mutex);
  if (!s.open) return s.closed_reason();
  if (auto ec = detail::check_outgoing(f, s.options)) return ec;
  auto bytes = detail::encode_frame(f, s.options.max_frame_size);
  if (!bytes) return bytes.error();
  auto ec = s.write(*bytes, f.fds, deadline);
  s.publish();
  return ec;
}

result<frame> blocking_connection::receive(clock::time_point deadline) {
  auto& s = *impl_;
  std::lock_guard lock(s.mutex);
  // Frames that came before the connection closed are still delivered.
  if (s.inbox.empty()) {
    if (!s.open) return s.closed_reason();
    if (auto ec = s.pump([&s] { return !s.inbox.empty(); }, deadline); ec && s.inbox.empty())
      return ec;
  }
  frame f = std::move(s.inbox.front());
  s.inbox.pop_front();
  s.publish();
  return f;
}

void blocking_connection::close() {
  auto& s = *impl_;
  // Wakes a thread blocked in recvmsg or sendmsg first; it then sees `closing`.
  s.closing.store(true);
  ::shutdown(s.fd.get(), SHUT_RDWR);
  std::lock_guard lock(s.mutex);
  s.fail(boost::asio::error::operation_aborted);
}

void blocking_connection::release_after_fork() noexcept {
  impl_->closing.store(true);
  impl_->fd.reset();  // close(2) only: a shutdown would end the parent's connection too
}

bool blocking_connection::is_open() const { return !impl_->closed_reason(); }
error_code blocking_connection::close_reason() const { return impl_->closed_reason(); }
const peer_credentials& blocking_connection::peer() const noexcept { return impl_->peer; }

connection_stats blocking_connection::stats() const {
  std::lock_guard lock(impl_->published_mutex);
  return impl_->published;
}

}  // namespace uipc
