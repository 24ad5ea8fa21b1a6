// handle_daemon: startup, sessions and their release, repairs of dead processes, stop.
// The state and its locking are described in daemon_state.hpp; the request
// handlers are in daemon_requests.cpp.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <boost/asio/io_context.hpp>
#include <random>

#include "daemon_state.hpp"

namespace uipc::handles {

namespace asio = boost::asio;

handle_daemon::impl::impl(asio::io_context& c, daemon_options o)
    : ctx(c),
      options(std::move(o)),
      router(router_errors{make_error_code(errc::bad_request),
                           make_error_code(errc::unknown_request),
                           make_error_code(errc::reply_too_large)}),
      repair_timer(c),
      scratch(options.scratch_size, 16) {}

error_code handle_daemon::impl::open() {
  auto resolved = resolve(options.where);
  if (!resolved) return resolved.error();
  where = *resolved;
  if (options.capacity < 2 || options.capacity > (1u << 24))
    return make_error_code(errc::invalid_argument);
  if (options.scratch_size > (std::size_t{1} << 32)) return make_error_code(errc::invalid_argument);
  if (options.max_references == 0) return make_error_code(errc::invalid_argument);

  // Anonymous (a sealed memfd), handed to each client in the hello reply: no
  // name another uid could take first, no size another process could change
  // under our mappings (the seals forbid it), nothing left behind by a kill.
  auto seg = shm_segment::create_anonymous(
      detail::segment_bytes(options.capacity, options.scratch_size), detail::identity);
  if (!seg) return seg.error();
  segment.emplace(std::move(*seg));
  std::random_device entropy;
  const std::uint64_t epoch = (static_cast<std::uint64_t>(entropy()) << 32) | entropy();
  view = detail::format_segment(segment->data(), segment->size(), options.capacity,
                                options.scratch_size, epoch);
  // Without it (no set_robust_list: an emulator, a seccomp filter) the word
  // stays 0 and clients ask the kernel about us instead (mapping::daemon_gone).
  if (auto flag = death_flag::arm(view.header->death_word)) death = std::move(*flag);

  records.assign(options.capacity, detail::slot_record{});
  record_types.assign(options.capacity, object_type::none);
  for (std::uint32_t i = 1; i < options.capacity; ++i) {
    free_slots.push_back(i);
    view.at(i).generation.store(1);
  }
  register_requests();

  server_options so;
  so.listen.mode = 0600;
  so.listen.connection.max_frame_size = detail::max_request_frame;
  so.partial_frame_timeout = std::chrono::seconds(5);
  so.listen.connection.error_categories = {&handles_category()};
  // No request carries descriptors: a client that sends one is dropped, and
  // the connection may read without the control buffer (one system call
  // less per request).
  so.listen.connection.peer_sends_fds = false;
  // The directory is private and the socket 0600; the kit's default admission
  // (the server's own uid) refuses root-owned peers of another uid too.
  std::weak_ptr<impl> weak = weak_from_this();
  so.on_session_start = [weak](const std::shared_ptr<server_session>& s) {
    if (auto self = weak.lock()) self->session_started(*s);
  };
  so.on_session_end = [weak](server_session& s, error_code) {
    if (auto self = weak.lock()) self->session_ended(s);
  };
  if (options.on_idle) {
    so.linger = options.linger;
    so.on_idle = [weak] {
      auto self = weak.lock();
      if (!self) return;
      self->stop();
      self->options.on_idle();
    };
  }
  // One daemon per location: the listener's lock on the socket path is the
  // instance lock (a daemon killed with -9 released it with its last descriptor).
  // Locked across the start: a request that comes at once waits for `serving`.
  std::lock_guard lock(mutex);
  auto started = server::start(ctx, where.socket_path, router, std::move(so));
  if (!started) {
    // The starting client sees our process go.
    detail::publish_state(view, detail::daemon_state::died_at_startup);
    death.reset();
    segment.reset();
    return started.error();
  }
  serving = std::move(*started);
  detail::publish_state(view, detail::daemon_state::running);
  return {};
}

void handle_daemon::impl::session_started(const server_session& s) {
  std::lock_guard lock(mutex);
  if (!stopped) ++sessions_per_pid[s.peer().pid];
}

void handle_daemon::impl::session_ended(const server_session& s) {
  std::lock_guard lock(mutex);
  if (stopped) return;
  const std::int32_t pid = s.peer().pid;
  auto it = sessions_per_pid.find(pid);
  if (it != sessions_per_pid.end() && --it->second == 0) {
    sessions_per_pid.erase(it);
    repair_locked(pid, s.pidfd());
  }
  greeted.erase(s.id());
  for (const auto& [index, count] : handle_refs.release_all(s.id())) drop_refs(index, count);
  for (const auto& [offset, count] : scratch_refs.release_all(s.id())) {
    (void)count;
    free_scratch_block(offset);
  }
}

// Never waits for a slot lock: a live process holding one (stopped, say)
// would hold the daemon too. What is left is retried on a timer. The process's
// own locks are undone only once its pidfd (or, without one, the kernel asked
// by pid) says it has exited: its last session can end while it still runs
// (dropped for bad frames or silence), or just before its exit completes.
void handle_daemon::impl::repair_locked(std::int32_t pid, int pidfd) {
  const bool exited = pidfd >= 0 && pidfd_exited(pidfd);
  const auto r = detail::repair_dead_process(view, pid, record_types, exited);
  abandoned_total += r.abandoned;
  if (!r.incomplete) return;
  const bool listed = std::any_of(pending_repairs.begin(), pending_repairs.end(),
                                  [pid](const pending_repair& p) { return p.pid == pid; });
  if (!listed) {
    unique_fd copy(pidfd >= 0 ? ::fcntl(pidfd, F_DUPFD_CLOEXEC, 0) : -1);
    pending_repairs.push_back({pid, std::move(copy)});
  }
  arm_repair_timer();
}

void handle_daemon::impl::arm_repair_timer() {
  if (repair_timer_armed || stopped) return;
  repair_timer_armed = true;
  repair_timer.expires_after(std::chrono::milliseconds(50));
  repair_timer.async_wait([self = shared_from_this()](error_code ec) {
    std::lock_guard lock(self->mutex);
    self->repair_timer_armed = false;
    if (ec || self->stopped) return;
    auto pending = std::move(self->pending_repairs);
    self->pending_repairs.clear();
    // A process that connected again under a reused pid is not dead.
    for (const pending_repair& p : pending) {
      if (!self->sessions_per_pid.contains(p.pid)) self->repair_locked(p.pid, p.pidfd.get());
    }
  });
}

// Publishes "stopped" first (waiters in every process fail with daemon_lost),
// then stops the server (no new session, handlers finish, every session ends),
// then unmaps the segment. A forked child's copy only lets go of its own
// descriptors and mapping (the server kit drops its copy likewise).
void handle_daemon::impl::stop() {
  const bool forked_copy = fork.forked_copy();
  {
    std::unique_lock lock(mutex, std::defer_lock);
    if (!forked_copy) {
      lock.lock();
    } else if (!lock.try_lock()) {
      return;  // held at the fork by a thread that did not follow: left as it is
    }
    if (stopped) return;
    stopped = true;
    if (!forked_copy) {
      repair_timer.cancel();
      if (segment) detail::publish_state(view, detail::daemon_state::stopped);
    }
  }
  if (serving) serving->stop();
  std::lock_guard lock(mutex);
  death.reset();
  segment.reset();
  view = {};
}

daemon_stats handle_daemon::impl::stats_locked() const {
  daemon_stats s;
  s.capacity = options.capacity;
  s.handles_in_use = static_cast<std::uint32_t>(options.capacity - 1 - free_slots.size());
  s.scratch_size = scratch.size();
  s.scratch_in_use = scratch.in_use();
  s.scratch_blocks = static_cast<std::uint32_t>(scratch.blocks());
  if (serving) {
    const server_stats k = serving->stats();
    s.clients = static_cast<std::uint32_t>(k.sessions);
    s.requests = k.requests;
    s.errors = k.errors;
  }
  s.mutexes_abandoned = abandoned_total;
  s.daemon_pid = static_cast<std::int32_t>(::getpid());
  return s;
}

handle_info handle_daemon::impl::object_locked(std::uint32_t index) const {
  const detail::slot_record& r = records[index];
  handle_info h;
  h.handle = handle_id{index, r.generation};
  h.type = r.type;
  h.refcount = r.refs;
  h.name = r.name;
  h.value = detail::slot_value(view.at(index));
  return h;
}

std::vector<client_info> handle_daemon::impl::clients_locked() const {
  std::vector<client_info> out;
  if (!serving) return out;
  for (const auto& s : serving->sessions()) {
    client_info c;
    c.session = s->id();
    c.pid = s->peer().pid;
    c.uid = s->peer().uid;
    c.handles = static_cast<std::uint32_t>(handle_refs.objects_held(s->id()));
    c.scratch_blocks = static_cast<std::uint32_t>(scratch_refs.objects_held(s->id()));
    out.push_back(c);
  }
  return out;
}

result<std::unique_ptr<handle_daemon>> handle_daemon::start(asio::io_context& ctx,
                                                            daemon_options options) {
  auto p = std::make_shared<impl>(ctx, std::move(options));
  if (auto ec = p->open()) return ec;
  return std::unique_ptr<handle_daemon>(
      new handle_daemon(std::move(p)));  // NOLINT(cppcoreguidelines-owning-memory)
}

handle_daemon::handle_daemon(std::shared_ptr<impl> p) : impl_(std::move(p)) {}
handle_daemon::~handle_daemon() { stop(); }
void handle_daemon::stop() { impl_->stop(); }

daemon_stats handle_daemon::stats() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->stats_locked();
}

std::vector<handle_info> handle_daemon::objects() const {
  std::lock_guard lock(impl_->mutex);
  std::vector<handle_info> out;
  if (impl_->stopped) return out;
  for (std::uint32_t i = 1; i < impl_->records.size(); ++i)
    if (impl_->records[i].type != object_type::none) out.push_back(impl_->object_locked(i));
  return out;
}

std::vector<client_info> handle_daemon::clients() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->clients_locked();
}

const resolved_location& handle_daemon::where() const noexcept { return impl_->where; }

}  // namespace uipc::handles
