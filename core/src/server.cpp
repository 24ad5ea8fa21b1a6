// server: the accept loop, the session table and the ordered stop of the server kit.
//
// One mutex guards the session table, the listener and the timers; it is never
// held while user code runs (admission, handlers, session hooks, on_idle).
// Requests do not take it: a request only bumps atomics, so the kit adds no
// lock to the hot path. An ordered stop waits for handlers running on other
// threads through the in-flight count, which a request raises before it looks
// at `stopped` (both sequentially consistent: either the stop sees the
// request, or the request sees the stop).
#include "uipc/core/server.hpp"

#include <malloc.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/steady_timer.hpp>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "uipc/core/process.hpp"
#include "wire.hpp"

#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77  // Linux 6.5; Debian 12's headers predate it
#endif

namespace uipc {

namespace asio = boost::asio;

namespace {

bool is_protocol_error(error_code ec) {
  return ec == errc::bad_frame || ec == errc::short_frame || ec == errc::frame_too_large ||
         ec == errc::too_many_fds || ec == errc::timed_out;
}

bool out_of_resources(error_code ec) {
  return ec == boost::system::errc::too_many_files_open ||
         ec == boost::system::errc::too_many_files_open_in_system ||
         ec == boost::system::errc::no_buffer_space || ec == boost::system::errc::not_enough_memory;
}

}  // namespace

struct server::impl : std::enable_shared_from_this<impl> {
  impl(asio::io_context& c, const request_router& r, server_options o)
      : ctx(c), router(r), options(std::move(o)), accept_timer(c), idle_timer(c) {}

  asio::io_context& ctx;
  const request_router& router;
  server_options options;
  connection_options session_options;
  std::string path;

  mutable std::mutex mutex;
  std::unique_ptr<listener> accept_socket;
  asio::steady_timer accept_timer;  // the pause after EMFILE and friends
  asio::steady_timer idle_timer;
  std::uint64_t idle_epoch = 0;
  std::uint64_t consecutive_accept_failures = 0;
  std::unordered_map<std::uint64_t, std::shared_ptr<server_session>> sessions;
  std::uint64_t next_id = 1;
  std::size_t high_water = 0;  // most sessions since memory was last given back
  std::size_t ended_since_trim = 0;
  std::size_t starting = 0;  // admitted, start hook running, not yet in `sessions`
  server_stats counters;     // sessions and requests fields unused: see below

  std::atomic<bool> stopped{false};
  bool stopping = false;    // a stop() is under way (mutex)
  std::thread::id stopper;  // the thread running it (mutex)
  std::condition_variable stop_done;
  std::atomic<std::uint64_t> in_flight{0};
  fork_guard fork;  // see drop_forked_copy
  std::atomic<std::uint64_t> requests{0};
  std::atomic<std::uint64_t> errors{0};

  // A request handler or a session hook running on this thread, counted in
  // in_flight (raised by the caller, where it checked `stopped`) until it ends:
  // stop() returns only once none runs. The frames of this thread form a
  // chain (handlers of one server may call into another's and back): stop()
  // from one of them does not wait for the ones below it on its own thread.
  struct running {
    explicit running(impl& s) noexcept : server(s), below(innermost) { innermost = this; }
    running(const running&) = delete;
    running& operator=(const running&) = delete;
    ~running() {
      innermost = below;
      server.in_flight.fetch_sub(1);
    }
    impl& server;
    const running* below;
  };
  static thread_local const running* innermost;

  // ---- accepting ---------------------------------------------------------------

  void accept_next() {  // mutex held
    if (!accept_socket) return;
    accept_socket->async_accept_socket([self = shared_from_this()](error_code ec, unique_fd fd) {
      self->accepted(ec, std::move(fd));
    });
  }

  void accepted(error_code ec, unique_fd fd) {
    if (ec == asio::error::operation_aborted) return;
    if (fork.forked_copy()) return;  // an accept the parent armed, run by a forked child
    if (ec) {
      std::lock_guard lock(mutex);
      if (stopped || !accept_socket) return;
      if (!out_of_resources(ec)) {  // one bad connection: go on at once
        accept_next();
        return;
      }
      // EMFILE persists until something closes: accepting again at once would
      // spin. Pause, growing to a second while it lasts.
      ++counters.accept_failures;
      ++consecutive_accept_failures;
      const auto pause = std::chrono::milliseconds(std::min<std::uint64_t>(
          1000, 10u << std::min<std::uint64_t>(consecutive_accept_failures, 7)));
      accept_timer.expires_after(pause);
      accept_timer.async_wait([self = shared_from_this()](error_code timer_ec) {
        if (timer_ec) return;
        std::lock_guard relock(self->mutex);
        if (!self->stopped) self->accept_next();
      });
      return;
    }
    // Who it is, and whether it may come in, before any byte of it is read.
    error_code refusal;
    auto identity = read_peer_identity(fd.get());
    if (!identity) {
      refusal = identity.error();
    } else if (options.admit) {
      refusal = options.admit(*identity);
    } else if (identity->uid != ::geteuid()) {
      refusal = make_error_code(errc::permission_denied);
    }

    std::shared_ptr<server_session> session;
    {
      std::lock_guard lock(mutex);
      if (stopped || !accept_socket) return;  // the descriptor closes unread
      consecutive_accept_failures = 0;
      accept_next();
      if (!refusal && sessions.size() >= options.max_sessions)
        refusal = make_error_code(errc::shutting_down);
      if (refusal) {
        ++counters.refusals;
        tell_refused(fd.get(), refusal);
        return;  // the descriptor closes unread
      }
      reserve_reactor_states();
      unique_fd pidfd = peer_pidfd(fd.get(), identity->pid);
      auto conn = connection::adopt(ctx, std::move(fd), session_options);
      if (!conn) {
        ++counters.refusals;
        return;
      }
      session = std::make_shared<server_session>(next_id++, std::move(*identity), std::move(pidfd),
                                                 std::move(*conn));
      ++counters.sessions_total;
      ++starting;
      in_flight.fetch_add(1);  // under the lock stop() sets `stopped` under
      ++idle_epoch;
      idle_timer.cancel();
    }
    running hooks(*this);
    // The session joins the table only after its start hook, so its end hook
    // can never run first: until receive() nothing can end it but stop(),
    // which cannot see it yet — so if the server stopped meanwhile, we end it.
    if (options.on_session_start) options.on_session_start(session);
    bool joined = false;
    {
      std::lock_guard lock(mutex);
      --starting;
      joined = !stopped;
      if (joined) {
        sessions.emplace(session->id(), session);
        high_water = std::max(high_water, sessions.size());
      }
    }
    if (!joined) {
      session->close();
      if (options.on_session_end)
        options.on_session_end(*session, make_error_code(errc::shutting_down));
      return;
    }
    receive(session);
  }

  static unique_fd peer_pidfd(int socket_fd, pid_t pid);
  void drop_forked_copy();

  // A refused peer learns why (an error notice, which closes its end with that
  // reason) instead of seeing a bare hang-up. Never waits: a peer whose buffer
  // is full gets the hang-up alone.
  static void tell_refused(int fd, error_code refusal) {
    const auto notice = detail::encode_error_notice(refusal);
    (void)::send(fd, notice.data(), notice.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
  }

  // Asio's reactor keeps the state of every descriptor it ever registered in a
  // pool and never frees it. Allocated one at a time, between the sessions'
  // own memory, those states would pin a page of the heap per session after
  // the sessions are gone, and malloc_trim could give nothing back. So the
  // server grows that pool 64 states at a time, back to back (registering
  // eventfds and closing them), ahead of its sessions: the states then sit on
  // a few pages of their own. Mutex held.
  void reserve_reactor_states() {
    if (sessions.size() < reserved_states) return;
    constexpr std::size_t batch_size = 64;
    std::vector<asio::posix::stream_descriptor> batch;
    batch.reserve(batch_size);
    for (std::size_t i = 0; i < batch_size; ++i) {
      const int fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
      if (fd < 0) break;  // out of descriptors: sessions then take states one by one
      boost::system::error_code ec;
      batch.emplace_back(ctx);
      batch.back().assign(fd, ec);
      if (ec) {
        ::close(fd);
        batch.pop_back();
        break;
      }
    }
    reserved_states += batch.size();
  }  // closing the batch gives its states to the pool
  std::size_t reserved_states = 0;

  // ---- serving -----------------------------------------------------------------

  void receive(const std::shared_ptr<server_session>& s) {
    s->conn()->async_receive([self = shared_from_this(), s](error_code ec, frame f) {
      if (ec) {
        self->end(*s, ec);
        return;
      }
      if (!self->serve(*s, f)) return;
      self->receive(s);
    });
  }

  // False once the server stops: the session is being ended by stop().
  bool serve(server_session& s, const frame& f) {
    if (fork.forked_copy()) return false;  // the parent's request (drop_forked_copy)
    in_flight.fetch_add(1);
    if (stopped.load()) {
      in_flight.fetch_sub(1);
      return false;
    }
    running handler(*this);
    bool failed = false;
    std::optional<frame> reply = router.serve(s, f, failed);
    requests.fetch_add(1, std::memory_order_relaxed);
    if (failed) errors.fetch_add(1, std::memory_order_relaxed);
    // A reply over the frame limit is not sent; the client must still get an
    // answer, or it waits for one until its deadline.
    if (reply && s.conn()->send(std::move(*reply)) == errc::frame_too_large)
      (void)s.conn()->send(make_error_reply(f, router.errors().reply_too_large));
    return true;
  }

  // Ends a session once: whoever takes it out of the table calls the hook.
  void end(server_session& s, error_code reason) {
    // A forked child's copy ending (its inherited read closed it): the session
    // is the parent's, and so is what the hook would release.
    if (fork.forked_copy()) return;
    bool trim = false;
    {
      std::lock_guard lock(mutex);
      auto it = sessions.find(s.id());
      if (it == sessions.end()) return;
      sessions.erase(it);
      in_flight.fetch_add(1);  // its hook below: stop() waits for it
      if (is_protocol_error(reason)) ++counters.protocol_errors;
      if (sessions.empty() && !stopped) arm_idle_timer(options.linger);
      // Many sessions came and went: give their memory back to the system
      // (freed heap pages in the middle of an arena stay with the process
      // otherwise). Halving the high-water mark bounds how often this runs.
      ++ended_since_trim;
      if (ended_since_trim >= 32 && (sessions.size() <= high_water / 2 || sessions.empty())) {
        trim = true;
        high_water = sessions.size();
        ended_since_trim = 0;
      }
    }
    running hook(*this);
    s.close();
    if (options.on_session_end) options.on_session_end(s, reason);
    if (trim) ::malloc_trim(0);
  }

  // ---- idle and stop -----------------------------------------------------------

  void arm_idle_timer(std::chrono::milliseconds delay) {  // mutex held
    if (!options.on_idle) return;
    const std::uint64_t epoch = ++idle_epoch;
    idle_timer.expires_after(delay);
    idle_timer.async_wait([self = shared_from_this(), epoch](error_code ec) {
      if (ec) return;
      {
        // Stops accepting under the lock that admits sessions, so none is
        // admitted and then dropped: one still in the backlog finds the socket
        // gone and can start a successor.
        std::lock_guard lock(self->mutex);
        if (self->stopped || !self->sessions.empty() || self->starting > 0 ||
            self->idle_epoch != epoch || !self->accept_socket)
          return;
        self->accept_socket->close();
        self->accept_socket.reset();
      }
      self->options.on_idle();
    });
  }

  void stop() {
    if (fork.forked_copy()) return drop_forked_copy();
    const auto keep = shared_from_this();  // a caller waiting below outlives ~server's call
    std::unordered_map<std::uint64_t, std::shared_ptr<server_session>> ending;
    {
      std::unique_lock lock(mutex);
      if (stopped.exchange(true)) {
        // Stopped or stopping: a later caller returns once the first is done,
        // as the first does. Except where waiting could wait for itself: on
        // the stopping thread (a hook of this stop), and inside any server's
        // handler or hook (the first stop may wait for it, directly or
        // through another server's stop).
        if (stopper == std::this_thread::get_id() || innermost != nullptr) return;
        stop_done.wait(lock, [this] { return !stopping; });
        return;
      }
      stopping = true;
      stopper = std::this_thread::get_id();
      accept_timer.cancel();
      idle_timer.cancel();
      if (accept_socket) accept_socket->close();
      accept_socket.reset();
    }
    // Whatever a hook throws, the callers waiting for this stop are let go.
    struct done_guard {
      impl& server;
      ~done_guard() {
        {
          std::lock_guard lock(server.mutex);
          server.stopping = false;
          server.stopper = {};
        }
        server.stop_done.notify_all();
      }
    } done{*this};
    // Handlers and hooks already running on other threads finish first (a
    // session starting ends itself, seeing `stopped`); new ones see `stopped`.
    await_running();
    {
      std::lock_guard lock(mutex);
      ending.swap(sessions);
    }
    for (auto& [id, s] : ending) {
      s->close();
      if (options.on_session_end) options.on_session_end(*s, make_error_code(errc::shutting_down));
    }
    // Sessions another thread took out of the table before the swap: their hooks.
    await_running();
  }

  // This thread's own frames of this server (handlers and hooks running).
  std::uint64_t own_frames() const {
    std::uint64_t own = 0;
    for (const running* r = innermost; r != nullptr; r = r->below) own += &r->server == this;
    return own;
  }

  void await_running() const {
    const std::uint64_t own = own_frames();
    for (int spins = 0; in_flight.load() > own; ++spins) {
      if (spins < 64)
        std::this_thread::yield();
      else
        std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }
};

// The copy a fork gave a child: the sessions, the socket file and whatever the
// hooks would release are the parent's, and the threads that ran handlers did
// not follow. The child closes its descriptors and nothing else: no hook runs,
// no wait. A lock held at the fork by a thread that did not follow stays held:
// then the copy is left as it is.
void server::impl::drop_forked_copy() {
  std::unordered_map<std::uint64_t, std::shared_ptr<server_session>> copies;
  {
    std::unique_lock lock(mutex, std::try_to_lock);
    if (!lock.owns_lock() || stopped.exchange(true)) return;
    if (accept_socket) accept_socket->close();
    accept_socket.reset();
    copies.swap(sessions);
  }
  for (auto& [id, s] : copies) s->close();
}

thread_local const server::impl::running* server::impl::innermost = nullptr;

// SO_PEERPIDFD names the process that connected, even if its pid has been
// reused since; pidfd_open of the pid is the fallback on kernels before 6.5.
unique_fd server::impl::peer_pidfd(int socket_fd, pid_t pid) {
  int fd = -1;
  socklen_t len = sizeof fd;
  if (::getsockopt(socket_fd, SOL_SOCKET, SO_PEERPIDFD, &fd, &len) == 0 && fd >= 0)
    return unique_fd(fd);
  return uipc::open_pidfd(pid);
}

// ---- server -------------------------------------------------------------------

result<std::unique_ptr<server>> server::start(asio::io_context& ctx, const std::string& path,
                                              const request_router& router,
                                              server_options options) {
  auto p = std::make_shared<impl>(ctx, router, std::move(options));
  p->session_options = p->options.listen.connection;
  p->session_options.first_frame_timeout = p->options.first_frame_timeout;
  p->session_options.partial_frame_timeout = p->options.partial_frame_timeout;
  auto bound = listener::bind(ctx, path, p->options.listen);
  if (!bound) return bound.error();
  p->path = path;
  {
    std::lock_guard lock(p->mutex);
    p->accept_socket = std::move(*bound);
    p->accept_next();
    p->arm_idle_timer(std::max(p->options.linger, p->options.startup_grace));
  }
  return std::unique_ptr<server>(
      new server(std::move(p)));  // NOLINT(cppcoreguidelines-owning-memory): private constructor
}

server::server(std::shared_ptr<impl> p) : impl_(std::move(p)) {}
server::~server() { stop(); }
void server::stop() { impl_->stop(); }
const std::string& server::path() const noexcept { return impl_->path; }

server_stats server::stats() const {
  std::lock_guard lock(impl_->mutex);
  server_stats s = impl_->counters;
  s.sessions = impl_->sessions.size();
  s.requests = impl_->requests.load(std::memory_order_relaxed);
  s.errors = impl_->errors.load(std::memory_order_relaxed);
  return s;
}

std::vector<std::shared_ptr<server_session>> server::sessions() const {
  std::lock_guard lock(impl_->mutex);
  std::vector<std::shared_ptr<server_session>> all;
  all.reserve(impl_->sessions.size());
  for (const auto& [id, s] : impl_->sessions) all.push_back(s);
  return all;
}

std::uint64_t raise_descriptor_limit() noexcept {
  rlimit lim{};
  if (::getrlimit(RLIMIT_NOFILE, &lim) != 0) return 0;
  if (lim.rlim_cur < lim.rlim_max) {
    rlimit raised = lim;
    raised.rlim_cur = lim.rlim_max;
    if (::setrlimit(RLIMIT_NOFILE, &raised) == 0) lim = raised;
  }
  return lim.rlim_cur;
}

}  // namespace uipc
