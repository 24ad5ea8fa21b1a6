// Connecting a client: the session (socket + mapped segment), fork handling,
// the control round trip, and client::connect with daemon autostart.
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <boost/container/static_vector.hpp>
#include <mutex>
#include <optional>
#include <thread>

#include "owned_mutexes.hpp"
#include "session.hpp"
#include "uipc/core/rendezvous.hpp"
#include "uipc/handles/client.hpp"
#include "uipc/proto/handles.pb.h"

namespace uipc::handles {

namespace pb = uipc::proto::handles;
using detail::request_type;
using steady = std::chrono::steady_clock;

namespace detail {

bool mapping::kernel_says_gone(bool throttled) noexcept {
  if (throttled) {
    timespec now{};
    ::clock_gettime(CLOCK_MONOTONIC_COARSE, &now);
    const std::int64_t ns = static_cast<std::int64_t>(now.tv_sec) * 1'000'000'000 + now.tv_nsec;
    if (ns < next_check_ns.load(std::memory_order_relaxed)) return false;
    next_check_ns.store(ns + 10'000'000, std::memory_order_relaxed);
  }
  return daemon_pidfd ? pidfd_exited(daemon_pidfd.get()) : !process_alive(daemon_pid);
}

// ---- fork ------------------------------------------------------------------------
//
// A child made by fork() without exec inherits every client's socket. If it
// kept them, the daemon would not see the parent die while the child lives,
// and the parent's references and mutexes would outlive it. So the child
// closes its copies at once (in the atfork child handler, before fork()
// returns) and its inherited clients report errc::forked_copy.

namespace {

struct session_registry {
  std::mutex mutex;
  std::vector<session*> live;
};

// Never destroyed: sessions of static clients may go after static destructors ran.
session_registry& registry() {
  static auto* r = new session_registry;  // NOLINT(cppcoreguidelines-owning-memory)
  return *r;
}

void before_fork() { registry().mutex.lock(); }
void after_fork_in_parent() { registry().mutex.unlock(); }
void after_fork_in_child() {
  auto& r = registry();
  for (session* s : r.live) {
    if (!s->map) continue;  // still connecting: it has no connection to give up
    s->map->forked.store(true);
    s->map->lost.store(true);
    if (s->conn) s->conn->release_after_fork();
  }
  r.mutex.unlock();  // held by this thread since before_fork
}

}  // namespace

session::session() {
  static std::once_flag once;
  std::call_once(once,
                 [] { ::pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child); });
  std::lock_guard lock(registry().mutex);
  registry().live.push_back(this);
}

session::~session() {
  std::lock_guard lock(registry().mutex);
  std::erase(registry().live, this);
}

result<frame> session::call(request_type type, std::string payload,
                            std::optional<steady::time_point> deadline) {
  if (map->lost.load()) return map->lost_reason();
  frame request;
  request.type = static_cast<std::uint32_t>(type);
  request.payload = std::move(payload);
  auto reply =
      conn->call(std::move(request), deadline ? *deadline : steady::now() + options.call_timeout);
  if (reply) return reply;
  const error_code ec = reply.error();
  if (conn->is_open()) {
    // A daemon that does not answer (stopped, stuck): the call is given up, a
    // late reply will be dropped.
    if (ec == uipc::errc::timed_out) return make_error_code(errc::daemon_timeout);
    return ec;  // the daemon's answer, or a request refused before it went
  }
  map->lost.store(true);
  return make_error_code(errc::daemon_lost);
}

void session::post(request_type type, std::string payload) {
  if (map->lost.load()) return;
  frame notice;
  notice.kind = frame_kind::notice;
  notice.type = static_cast<std::uint32_t>(type);
  notice.payload = std::move(payload);
  // Notices on a connection are served in order with its requests, so every
  // later request sees this one done.
  if (conn->send(std::move(notice), steady::now() + options.call_timeout)) map->lost.store(true);
}

bool retryable(const error_code& ec) {
  return ec == errc::daemon_lost || ec == errc::daemon_unavailable ||
         ec == uipc::errc::bad_segment || ec == uipc::errc::peer_closed ||
         ec == boost::system::errc::no_such_file_or_directory ||
         ec == boost::system::errc::connection_refused;
}

result<std::shared_ptr<session>> open_session(const client_options& options,
                                              const resolved_location& where,
                                              steady::time_point deadline) {
  auto s = std::make_shared<session>();
  s->options = options;
  s->map = std::make_shared<mapping>();
  connection_options co;
  co.error_categories = {&handles_category()};
  co.max_frame_size = 16 << 20;
  auto c = blocking_connection::connect(where.socket_path, co);
  if (!c) return c.error();
  s->conn.emplace(std::move(*c));
  // A socket in our private directory could still be served by another uid
  // (root, say): its daemon would not be ours.
  if (check_server_uid(s->conn->peer(), ::geteuid()))
    return make_error_code(errc::permission_denied);
  auto hello = s->call(request_type::hello, pb::HelloRequest{}.SerializeAsString(),
                       std::min(deadline, steady::now() + options.call_timeout));
  if (!hello) return hello.error();
  pb::HelloReply info;
  if (!info.ParseFromString(hello->payload)) return make_error_code(errc::bad_request);
  // Another build's daemon (an upgrade while the old one serves): said before
  // anything else of its reply is read, and not retried (a successor could not
  // start while it holds the location).
  if (info.layout_version() != identity.version) return make_error_code(errc::incompatible_daemon);
  // The segment is the daemon's memfd, passed with the reply; its size must be
  // the layout the daemon announced.
  if (hello->fds.size() != 1 || info.capacity() < 2 || info.capacity() > (1u << 24) ||
      info.scratch_size() > (std::uint64_t{1} << 32)) {
    return make_error_code(errc::bad_request);
  }
  auto seg = shm_segment::open_fd(std::move(hello->fds[0]), identity,
                                  segment_bytes(info.capacity(), info.scratch_size()) + 65536);
  if (!seg) return seg.error();
  // The layout is the daemon's word (its hello), checked against the mapping;
  // what the header says later does not move it.
  auto view = attach_segment(seg->data(), seg->size(), info.capacity(), info.scratch_size());
  if (!view) return view.error();
  // The memfd came with the hello on this connection: the hello's pid and
  // epoch are the daemon's, whatever a client wrote into the header's copies.
  if (!view->running() || view->daemon_died()) return make_error_code(errc::daemon_lost);
  view->daemon_pid = info.daemon_pid();
  view->epoch = info.epoch();
  s->map->daemon_pidfd = open_pidfd(static_cast<pid_t>(info.daemon_pid()));
  if (!s->map->daemon_pidfd && !process_alive(info.daemon_pid()))
    return make_error_code(errc::daemon_lost);
  s->map->segment.emplace(std::move(*seg));
  s->map->view = *view;
  s->map->daemon_pid = info.daemon_pid();
  return s;
}

}  // namespace detail

// ---- client ---------------------------------------------------------------------

result<client> client::connect(client_options options) {
  auto where = resolve(options.where);
  if (!where) return where.error();
  const auto deadline = steady::now() + options.start_timeout;
  std::shared_ptr<detail::session> reached;
  const auto reach = [&](steady::time_point until) -> error_code {
    auto s = detail::open_session(options, *where, until);
    if (!s) return s.error();
    reached = std::move(*s);
    return {};
  };
  if (!options.autostart) {
    if (auto ec = reach(deadline)) {
      return detail::retryable(ec) ? make_error_code(errc::daemon_unavailable) : ec;
    }
    return client(std::move(reached));
  }
  if (auto ec = detail::start_daemon(options, *where, reach, deadline)) return ec;
  return client(std::move(reached));
}

}  // namespace uipc::handles
