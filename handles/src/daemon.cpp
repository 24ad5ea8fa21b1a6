// handle_daemon: the table's lifetime fields, per-client references, and repairs.
//
// All daemon state is guarded by one std::mutex rather than a strand: stop() must
// finish synchronously from any thread (also from a destructor after the loop has
// stopped), and every handler is short and never blocks under it. on_idle, the
// only user callback, is called without the lock.
#include "uipc/handles/daemon.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <cstdio>
#include <cstring>
#include <deque>
#include <mutex>
#include <optional>
#include <random>
#include <thread>
#include <unordered_map>
#include <vector>

#include "protocol.hpp"
#include "scratch_allocator.hpp"
#include "segment.hpp"
#include "uipc/core/framed.hpp"
#include "uipc/core/ledger.hpp"
#include "uipc/core/shm.hpp"
#include "uipc/handles/error.hpp"
#include "uipc/proto/handles.pb.h"

namespace uipc::handles {

namespace asio = boost::asio;
namespace pb = uipc::proto::handles;
using detail::request_type;

namespace {

error_code system_error(int e) { return {e, boost::system::system_category()}; }

// The daemon's own record of a slot; shared memory only mirrors it.
struct slot_record {
  object_type type = object_type::none;
  std::uint32_t generation = 1;
  std::uint32_t refs = 0;
  std::string name;
};

struct session {
  connection::pointer conn;
  peer_credentials peer;
};

template <class Message>
bool parse(const frame& f, Message& m) {
  return m.ParseFromString(f.payload);
}

template <class Message>
frame reply_with(const frame& request, const Message& m) {
  return make_reply(request, request.type, m.SerializeAsString());
}

}  // namespace

struct handle_daemon::impl : std::enable_shared_from_this<impl> {
  impl(asio::io_context& c, daemon_options o)
      : ctx(c),
        options(std::move(o)),
        idle_timer(c),
        repair_timer(c),
        accept_timer(c),
        scratch(0) {}

  asio::io_context& ctx;
  daemon_options options;
  resolved_location where;

  mutable std::mutex mutex;
  bool stopped = false;
  unique_fd daemon_lock;
  std::optional<shm_segment> segment;
  detail::segment_view view;
  std::unique_ptr<listener> accept_socket;
  asio::steady_timer idle_timer;
  std::uint64_t idle_epoch = 0;
  // Repairs of dead processes that met a slot locked by a live process: retried
  // on this timer rather than waited for under the mutex.
  asio::steady_timer repair_timer;
  std::vector<std::int32_t> pending_repairs;
  bool repair_timer_armed = false;
  // Accept failures (EMFILE, ENFILE, ENOMEM) are retried after a pause, not at once.
  asio::steady_timer accept_timer;
  std::uint64_t accept_failures = 0;

  std::vector<slot_record> records;
  std::vector<object_type> record_types;  // records[i].type, contiguous for repairs
  std::deque<std::uint32_t> free_slots;
  std::unordered_map<std::string, std::uint32_t> names;
  detail::scratch_allocator scratch;

  std::unordered_map<std::uint64_t, session> sessions;
  std::uint64_t next_session = 1;
  ledger<std::uint64_t, std::uint32_t> handle_refs;
  ledger<std::uint64_t, std::uint64_t> scratch_refs;

  std::uint64_t requests = 0;
  std::uint64_t errors = 0;
  std::uint64_t abandoned_total = 0;

  // ---- startup ---------------------------------------------------------------

  error_code open() {
    auto resolved = resolve(options.where);
    if (!resolved) return resolved.error();
    where = *resolved;
    if (options.capacity < 2 || options.capacity > (1u << 24))
      return make_error_code(errc::invalid_argument);
    if (options.scratch_size > (std::size_t{1} << 32))
      return make_error_code(errc::invalid_argument);

    // One daemon per location: whoever holds this lock may replace the segment
    // (and a daemon killed with -9 released it with its last descriptor).
    const std::string lock_path = where.directory + "/uipc-" + options.where.name + ".daemon";
    daemon_lock.reset(::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600));
    if (!daemon_lock) return system_error(errno);
    // A predecessor that is stopping holds it for a moment more.
    for (int attempt = 0; ::flock(daemon_lock.get(), LOCK_EX | LOCK_NB) != 0; ++attempt) {
      if (errno != EWOULDBLOCK) return system_error(errno);
      if (attempt == 50) return make_error_code(uipc::errc::address_in_use);
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }

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

    records.assign(options.capacity, slot_record{});
    record_types.assign(options.capacity, object_type::none);
    for (std::uint32_t i = 1; i < options.capacity; ++i) {
      free_slots.push_back(i);
      view.at(i).generation.store(1);
    }
    scratch = detail::scratch_allocator(options.scratch_size);

    listener_options lo;
    lo.mode = 0600;
    lo.connection.max_frame_size = detail::max_request_frame;
    lo.connection.partial_frame_timeout = std::chrono::seconds(5);
    // No request carries descriptors: a client that sends one is dropped, and
    // the connection may read without the control buffer (one system call
    // less per request).
    lo.connection.peer_sends_fds = false;
    auto bound = listener::bind(ctx, where.socket_path, lo);
    if (!bound) {
      // The starting client sees our process go.
      detail::publish_state(view, detail::daemon_state::died_at_startup);
      segment.reset();
      return bound.error();
    }
    accept_socket = std::move(*bound);
    detail::publish_state(view, detail::daemon_state::running);
    return {};
  }

  // ---- connections -----------------------------------------------------------

  void accept_next() {
    accept_socket->async_accept([self = shared_from_this()](error_code ec, connection::pointer c) {
      if (ec) {
        if (ec == asio::error::operation_aborted) return;
        // EMFILE and friends persist until something closes: accepting again
        // at once would spin. Pause, growing to a second while it lasts.
        std::lock_guard lock(self->mutex);
        if (self->stopped) return;
        const bool out_of_resources = ec == boost::system::errc::too_many_files_open ||
                                      ec == boost::system::errc::too_many_files_open_in_system ||
                                      ec == boost::system::errc::no_buffer_space ||
                                      ec == boost::system::errc::not_enough_memory;
        if (!out_of_resources) {  // one bad connection: go on at once
          self->accept_next();
          return;
        }
        ++self->accept_failures;
        const auto pause = std::chrono::milliseconds(std::min<std::uint64_t>(
            1000, 10u << std::min<std::uint64_t>(self->accept_failures, 7)));
        self->accept_timer.expires_after(pause);
        self->accept_timer.async_wait([self](error_code timer_ec) {
          if (timer_ec) return;
          std::lock_guard relock(self->mutex);
          if (!self->stopped) self->accept_next();
        });
        return;
      }
      std::lock_guard lock(self->mutex);
      if (self->stopped) {
        c->close();
        return;
      }
      self->accept_failures = 0;
      // The directory is private and the socket 0600, so this only matters for
      // root-owned peers of another uid: they get nothing either.
      if (c->peer().uid != ::geteuid()) {
        c->close();
      } else {
        const std::uint64_t id = self->next_session++;
        self->sessions.emplace(id, session{c, c->peer()});
        ++self->idle_epoch;
        self->idle_timer.cancel();
        self->receive(id, c);
      }
      self->accept_next();
    });
  }

  void receive(std::uint64_t id, const connection::pointer& c) {
    c->async_receive([self = shared_from_this(), id, c](error_code ec, frame f) {
      if (ec) {
        self->disconnect(id);
        return;
      }
      frame reply;
      {
        std::lock_guard lock(self->mutex);
        if (self->stopped) return;
        ++self->requests;
        if (f.kind != frame_kind::request) {
          // A close or scratch free sent as a notice is served without a reply
          // (the client's destructors: no round trip). Other notices mean nothing.
          const auto type = static_cast<request_type>(f.type);
          if (type == request_type::close || type == request_type::scratch_free) {
            if (self->serve(id, f).error) ++self->errors;
          } else {
            ++self->errors;
          }
          self->receive(id, c);
          return;
        }
        reply = self->serve(id, f);
        if (reply.error) ++self->errors;
      }
      // A reply over the frame limit is not sent; the client must still get
      // an answer, or it waits for one until its deadline.
      if (c->send(std::move(reply)) == uipc::errc::frame_too_large)
        (void)c->send(make_error_reply(f, make_error_code(errc::reply_too_large)));
      self->receive(id, c);
    });
  }

  void disconnect(std::uint64_t id) {
    std::function<void()> idle_callback;
    {
      std::lock_guard lock(mutex);
      auto it = sessions.find(id);
      if (it == sessions.end()) return;
      const pid_t pid = it->second.peer.pid;
      it->second.conn->close();
      sessions.erase(it);
      if (stopped) return;
      bool process_still_connected = false;
      for (const auto& [other, s] : sessions) process_still_connected |= s.peer.pid == pid;
      if (!process_still_connected) repair_locked(pid);
      for (const auto& [index, count] : handle_refs.release_all(id)) drop_refs(index, count);
      for (const auto& [offset, count] : scratch_refs.release_all(id)) {
        (void)count;
        free_scratch_block(offset);
      }
      if (sessions.empty()) arm_idle_timer(options.linger);
    }
  }

  // Never waits for a slot lock: a live process holding one (stopped, say)
  // would hold the daemon too. What is left is retried on a timer.
  void repair_locked(std::int32_t pid) {
    const auto r = detail::repair_dead_process(view, pid, record_types);
    abandoned_total += r.abandoned;
    if (!r.incomplete) return;
    if (std::find(pending_repairs.begin(), pending_repairs.end(), pid) == pending_repairs.end())
      pending_repairs.push_back(pid);
    arm_repair_timer();
  }

  void arm_repair_timer() {
    if (repair_timer_armed || stopped) return;
    repair_timer_armed = true;
    repair_timer.expires_after(std::chrono::milliseconds(50));
    repair_timer.async_wait([self = shared_from_this()](error_code ec) {
      std::lock_guard lock(self->mutex);
      self->repair_timer_armed = false;
      if (ec || self->stopped) return;
      auto pids = std::move(self->pending_repairs);
      self->pending_repairs.clear();
      for (const std::int32_t pid : pids) {
        // A process that connected again under a reused pid is not dead.
        bool connected = false;
        for (const auto& [other, s] : self->sessions) connected |= s.peer.pid == pid;
        if (!connected) self->repair_locked(pid);
      }
    });
  }

  void arm_idle_timer(std::chrono::milliseconds delay) {
    if (!options.on_idle) return;
    const std::uint64_t epoch = ++idle_epoch;
    idle_timer.expires_after(delay);
    idle_timer.async_wait([self = shared_from_this(), epoch](error_code ec) {
      if (ec) return;
      {
        // Stops under the same lock that admits clients, so no client is
        // admitted and then dropped: one still in the backlog finds the
        // socket closed and starts a successor.
        std::lock_guard lock(self->mutex);
        if (self->stopped || !self->sessions.empty() || self->idle_epoch != epoch) return;
        self->stop_locked();
      }
      self->options.on_idle();
    });
  }

  // ---- table ------------------------------------------------------------------

  void drop_refs(std::uint32_t index, std::uint32_t count) {
    slot_record& r = records[index];
    r.refs = count >= r.refs ? 0 : r.refs - count;
    if (r.refs > 0) {
      detail::set_refcount(view, index, r.refs);
      return;
    }
    if (!r.name.empty()) names.erase(r.name);
    r = slot_record{object_type::none, r.generation + 1 == 0 ? 1 : r.generation + 1, 0, {}};
    record_types[index] = object_type::none;
    detail::retire_slot(view, index, r.generation);
    free_slots.push_back(index);
  }

  void free_scratch_block(std::uint64_t offset) {
    if (auto size = scratch.block_size(offset)) {
      std::memset(view.scratch + offset, 0, *size);
      scratch.free(offset);
    }
  }

  result<std::uint32_t> checked_index(const pb::HandleId& h) const {
    if (h.index() == 0 || h.index() >= records.size()) return make_error_code(errc::invalid_handle);
    const slot_record& r = records[h.index()];
    if (r.type == object_type::none || r.generation != h.generation())
      return make_error_code(errc::stale_handle);
    return h.index();
  }

  pb::HandleReply handle_reply(std::uint32_t index, bool existed) const {
    pb::HandleReply out;
    out.mutable_handle()->set_index(index);
    out.mutable_handle()->set_generation(records[index].generation);
    out.set_type(static_cast<pb::ObjectType>(records[index].type));
    out.set_existed(existed);
    return out;
  }

  void add_ref(std::uint64_t id, std::uint32_t index) {
    ++records[index].refs;
    detail::set_refcount(view, index, records[index].refs);
    handle_refs.acquire(id, index);
  }

  // ---- requests ---------------------------------------------------------------

  frame serve(std::uint64_t id, const frame& f) {
    switch (static_cast<request_type>(f.type)) {
      case request_type::hello:
        return on_hello(f);
      case request_type::create:
        return on_create(id, f);
      case request_type::open:
        return on_open(id, f);
      case request_type::close:
        return on_close(id, f);
      case request_type::scratch_store:
        return on_scratch_store(id, f);
      case request_type::scratch_free:
        return on_scratch_free(id, f);
      case request_type::list:
        return on_list(f);
      case request_type::stats:
        return on_stats(f);
      case request_type::clients:
        return on_clients(f);
    }
    return make_error_reply(f, make_error_code(errc::unknown_request));
  }

  frame on_hello(const frame& f) {
    pb::HelloRequest in;
    if (!parse(f, in)) return make_error_reply(f, make_error_code(errc::bad_request));
    pb::HelloReply out;
    out.set_daemon_pid(static_cast<std::int32_t>(::getpid()));
    out.set_epoch(view.header->epoch.load());
    out.set_capacity(options.capacity);
    out.set_scratch_size(options.scratch_size);
    frame reply = reply_with(f, out);
    unique_fd memfd(::fcntl(segment->fd(), F_DUPFD_CLOEXEC, 0));
    if (!memfd) return make_error_reply(f, system_error(errno));
    reply.fds.push_back(std::move(memfd));
    return reply;
  }

  frame on_create(std::uint64_t id, const frame& f) {
    pb::CreateRequest in;
    if (!parse(f, in)) return make_error_reply(f, make_error_code(errc::bad_request));
    const auto type = static_cast<object_type>(in.type());
    detail::object_init init;
    init.type = type;
    switch (type) {
      case object_type::manual_event:
      case object_type::auto_event:
        init.value = in.initial_state() ? 1 : 0;
        break;
      case object_type::semaphore:
        if (in.max_count() == 0 || in.initial_count() > in.max_count()) {
          return make_error_reply(f, make_error_code(errc::bad_request));
        }
        init.value = in.initial_count();
        init.max_count = in.max_count();
        break;
      case object_type::mutex:
        if (in.initial_state()) {
          if (in.owner_tid() == 0) return make_error_reply(f, make_error_code(errc::bad_request));
          init.value = in.owner_tid();
          init.owner_pid = sessions.at(id).peer.pid;
        }
        break;
      default:
        return make_error_reply(f, make_error_code(errc::bad_request));
    }
    if (in.name().size() > max_name_length)
      return make_error_reply(f, make_error_code(errc::name_too_long));
    if (in.name().find('\0') != std::string::npos)
      return make_error_reply(f, make_error_code(errc::bad_request));
    if (!in.name().empty()) {
      if (auto it = names.find(in.name()); it != names.end()) {
        if (records[it->second].type != type)
          return make_error_reply(f, make_error_code(errc::name_in_use));
        add_ref(id, it->second);
        return reply_with(f, handle_reply(it->second, true));
      }
    }
    if (free_slots.empty()) return make_error_reply(f, make_error_code(errc::table_full));
    const std::uint32_t index = free_slots.front();
    free_slots.pop_front();
    slot_record& r = records[index];
    r.type = type;
    record_types[index] = type;
    r.refs = 0;
    r.name = in.name();
    init.name = r.name;
    detail::publish_slot(view, index, r.generation, init);
    if (!r.name.empty()) names.emplace(r.name, index);
    add_ref(id, index);
    return reply_with(f, handle_reply(index, false));
  }

  frame on_open(std::uint64_t id, const frame& f) {
    pb::OpenRequest in;
    if (!parse(f, in)) return make_error_reply(f, make_error_code(errc::bad_request));
    std::uint32_t index = 0;
    if (!in.name().empty()) {
      if (in.name().size() > max_name_length)
        return make_error_reply(f, make_error_code(errc::name_too_long));
      auto it = names.find(in.name());
      if (it == names.end()) return make_error_reply(f, make_error_code(errc::name_not_found));
      index = it->second;
    } else {
      auto checked = checked_index(in.handle());
      if (!checked) return make_error_reply(f, checked.error());
      index = *checked;
    }
    add_ref(id, index);
    return reply_with(f, handle_reply(index, true));
  }

  frame on_close(std::uint64_t id, const frame& f) {
    pb::CloseRequest in;
    if (!parse(f, in)) return make_error_reply(f, make_error_code(errc::bad_request));
    auto checked = checked_index(in.handle());
    if (!checked) return make_error_reply(f, checked.error());
    auto left = handle_refs.release(id, *checked);
    if (!left) {
      // The seed's lesson: a close with no reference held warns and changes nothing.
      std::fprintf(stderr, "uipc-handled: close of %u:%u by pid %d, which holds no reference\n",
                   *checked, in.handle().generation(), static_cast<int>(sessions.at(id).peer.pid));
      return make_error_reply(f, make_error_code(errc::not_held));
    }
    drop_refs(*checked, 1);
    pb::CloseReply out;
    out.set_destroyed(records[*checked].refs == 0);
    out.set_held_left(*left);
    return reply_with(f, out);
  }

  frame on_scratch_store(std::uint64_t id, const frame& f) {
    pb::ScratchStoreRequest in;
    if (!parse(f, in) || in.size() == 0)
      return make_error_reply(f, make_error_code(errc::bad_request));
    auto offset = scratch.allocate(in.size());
    if (!offset) return make_error_reply(f, make_error_code(errc::scratch_exhausted));
    const std::uint64_t size = *scratch.block_size(*offset);
    std::memset(view.scratch + *offset, 0, size);
    scratch_refs.acquire(id, *offset);
    pb::ScratchStoreReply out;
    out.set_offset(*offset);
    out.set_size(size);
    return reply_with(f, out);
  }

  frame on_scratch_free(std::uint64_t id, const frame& f) {
    pb::ScratchFreeRequest in;
    if (!parse(f, in)) return make_error_reply(f, make_error_code(errc::bad_request));
    if (!scratch_refs.release(id, in.offset()))
      return make_error_reply(f, make_error_code(errc::bad_scratch_offset));
    free_scratch_block(in.offset());
    return reply_with(f, pb::Empty{});
  }

  frame on_list(const frame& f) {
    pb::ListRequest in;
    if (!parse(f, in)) return make_error_reply(f, make_error_code(errc::bad_request));
    pb::ListReply out;
    // Paged: a whole table of long names would not fit in one frame.
    constexpr int page_entries = 256;  // at most ~100 bytes each: well under 64 KiB
    for (std::uint32_t i = std::max<std::uint32_t>(1, in.start_index()); i < records.size(); ++i) {
      const slot_record& r = records[i];
      if (r.type == object_type::none) continue;
      if (out.entries_size() == page_entries) {
        out.set_next_index(i);
        break;
      }
      auto* e = out.add_entries();
      e->mutable_handle()->set_index(i);
      e->mutable_handle()->set_generation(r.generation);
      e->set_type(static_cast<pb::ObjectType>(r.type));
      e->set_refcount(r.refs);
      e->set_name(r.name);
      e->set_value(detail::slot_value(view.at(i)));
    }
    return reply_with(f, out);
  }

  frame on_stats(const frame& f) {
    pb::StatsRequest in;
    if (!parse(f, in)) return make_error_reply(f, make_error_code(errc::bad_request));
    const daemon_stats s = stats_locked();
    pb::StatsReply out;
    out.set_capacity(s.capacity);
    out.set_handles_in_use(s.handles_in_use);
    out.set_clients(s.clients);
    out.set_scratch_size(s.scratch_size);
    out.set_scratch_in_use(s.scratch_in_use);
    out.set_scratch_blocks(s.scratch_blocks);
    out.set_requests(s.requests);
    out.set_errors(s.errors);
    out.set_daemon_pid(s.daemon_pid);
    out.set_mutexes_abandoned(s.mutexes_abandoned);
    return reply_with(f, out);
  }

  // One reply for all: at ~20 bytes an entry, some 3000 clients fit the frame
  // limit; beyond that the client gets reply_too_large.
  frame on_clients(const frame& f) {
    pb::ClientsRequest in;
    if (!parse(f, in)) return make_error_reply(f, make_error_code(errc::bad_request));
    pb::ClientsReply out;
    for (const auto& [id, s] : sessions) {
      auto* e = out.add_clients();
      e->set_session(id);
      e->set_pid(s.peer.pid);
      e->set_uid(s.peer.uid);
      e->set_handles(static_cast<std::uint32_t>(handle_refs.objects_held(id)));
      e->set_scratch_blocks(static_cast<std::uint32_t>(scratch_refs.objects_held(id)));
    }
    return reply_with(f, out);
  }

  daemon_stats stats_locked() const {
    daemon_stats s;
    s.capacity = options.capacity;
    s.handles_in_use = static_cast<std::uint32_t>(options.capacity - 1 - free_slots.size());
    s.clients = static_cast<std::uint32_t>(sessions.size());
    s.scratch_size = scratch.size();
    s.scratch_in_use = scratch.in_use();
    s.scratch_blocks = static_cast<std::uint32_t>(scratch.blocks());
    s.requests = requests;
    s.errors = errors;
    s.mutexes_abandoned = abandoned_total;
    s.daemon_pid = static_cast<std::int32_t>(::getpid());
    return s;
  }

  void stop() {
    std::lock_guard lock(mutex);
    stop_locked();
  }

  void stop_locked() {
    if (stopped) return;
    stopped = true;
    idle_timer.cancel();
    repair_timer.cancel();
    accept_timer.cancel();
    if (segment) detail::publish_state(view, detail::daemon_state::stopped);
    for (auto& [id, s] : sessions) s.conn->close();
    sessions.clear();
    // Unmapped before the socket and the lock go: a successor never shares
    // anything with us (the segment is anonymous; clients keep their mappings).
    segment.reset();
    view = {};
    if (accept_socket) accept_socket->close();
    daemon_lock.reset();
  }
};

result<std::unique_ptr<handle_daemon>> handle_daemon::start(asio::io_context& ctx,
                                                            daemon_options options) {
  auto p = std::make_shared<impl>(ctx, std::move(options));
  if (auto ec = p->open()) return ec;
  {
    std::lock_guard lock(p->mutex);
    p->accept_next();
    p->arm_idle_timer(
        std::max<std::chrono::milliseconds>(p->options.linger, std::chrono::seconds(2)));
  }
  return std::unique_ptr<handle_daemon>(new handle_daemon(std::move(p)));
}

handle_daemon::handle_daemon(std::shared_ptr<impl> p) : impl_(std::move(p)) {}
handle_daemon::~handle_daemon() { stop(); }
void handle_daemon::stop() { impl_->stop(); }

daemon_stats handle_daemon::stats() const {
  std::lock_guard lock(impl_->mutex);
  return impl_->stats_locked();
}

const resolved_location& handle_daemon::where() const noexcept { return impl_->where; }

}  // namespace uipc::handles
