// The client facade: connecting (and starting a daemon), the control round trips,
// and object operations that run in the shared segment.
#include "uipc/handles/client.hpp"

#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sys/file.h>
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
#include "uipc/proto/handles.pb.h"

namespace uipc::handles {

namespace pb = uipc::proto::handles;
using detail::request_type;
using steady = std::chrono::steady_clock;

namespace detail {

bool mapping::daemon_gone() noexcept {
  timespec now{};
  ::clock_gettime(CLOCK_MONOTONIC_COARSE, &now);
  const std::int64_t ns = static_cast<std::int64_t>(now.tv_sec) * 1'000'000'000 + now.tv_nsec;
  if (ns < next_check_ns.load(std::memory_order_relaxed)) return false;
  next_check_ns.store(ns + 10'000'000, std::memory_order_relaxed);
  bool gone = false;
  if (daemon_pidfd) {
    pollfd p{daemon_pidfd.get(), POLLIN, 0};
    gone = ::poll(&p, 1, 0) > 0 && (p.revents & (POLLIN | POLLHUP | POLLERR)) != 0;
  } else {
    gone = !process_alive(daemon_pid);
  }
  if (gone) lost.store(true);
  return gone;
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
  std::call_once(once, [] { ::pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child); });
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
  auto reply = conn->call(std::move(request), deadline ? *deadline : steady::now() + options.call_timeout);
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

namespace {

bool retryable(error_code ec) {
  return ec == errc::daemon_lost || ec == errc::daemon_unavailable ||
         ec == uipc::errc::bad_segment || ec == uipc::errc::peer_closed ||
         ec == boost::system::errc::no_such_file_or_directory ||
         ec == boost::system::errc::connection_refused;
}

}  // namespace

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
  if (s->conn->peer().uid != ::geteuid()) return make_error_code(errc::permission_denied);
  auto hello = s->call(request_type::hello, pb::HelloRequest{}.SerializeAsString(),
                       std::min(deadline, steady::now() + options.call_timeout));
  if (!hello) return hello.error();
  pb::HelloReply info;
  if (!info.ParseFromString(hello->payload)) return make_error_code(errc::bad_request);
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
  if (view->header->daemon_pid.load() != info.daemon_pid() || !view->running()) {
    return make_error_code(errc::daemon_lost);
  }
  s->map->daemon_pidfd.reset(
      static_cast<int>(::syscall(SYS_pidfd_open, static_cast<pid_t>(info.daemon_pid()), 0)));
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
  error_code last;
  for (int round = 0; steady::now() < deadline; ++round) {
    auto s = detail::open_session(options, *where, deadline);
    if (s) return client(std::move(*s));
    last = s.error();
    if (!detail::retryable(last)) return last;
    if (!options.autostart) return make_error_code(errc::daemon_unavailable);
    if (round >= 4) break;
    // One starter at a time: the others wait here, then find the daemon it started.
    unique_fd lock(
        ::open(where->start_lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600));
    if (!lock) return error_code(errno, boost::system::system_category());
    while (::flock(lock.get(), LOCK_EX | LOCK_NB) != 0) {
      if (steady::now() >= deadline) return make_error_code(errc::daemon_start_timeout);
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    s = detail::open_session(options, *where, deadline);
    if (s) return client(std::move(*s));
    if (!detail::retryable(s.error())) return s.error();
    auto started = detail::start_daemon(options, *where, deadline);
    if (started) return client(std::move(*started));
    // Ours may have lost the location to a daemon started some other way.
    s = detail::open_session(options, *where, deadline);
    if (s) return client(std::move(*s));
    return started.error();
  }
  if (steady::now() >= deadline) return make_error_code(errc::daemon_start_timeout);
  return make_error_code(errc::daemon_unavailable);
}

client::client(std::shared_ptr<detail::session> s) : session_(std::move(s)) {}
client::client(client&&) noexcept = default;
client& client::operator=(client&&) noexcept = default;
client::~client() = default;

std::int32_t client::daemon_pid() const noexcept {
  return session_ ? session_->map->daemon_pid : 0;
}
bool client::connected() const noexcept { return session_ && session_->usable(); }

result<object> client::create(object_type type, std::string_view name, bool initial,
                              std::uint32_t count, std::uint32_t maximum) {
  if (!session_) return make_error_code(errc::daemon_lost);
  if (name.size() > max_name_length) return make_error_code(errc::name_too_long);
  pb::CreateRequest in;
  in.set_type(static_cast<pb::ObjectType>(type));
  in.set_name(std::string(name));
  in.set_initial_state(initial);
  in.set_initial_count(count);
  in.set_max_count(maximum);
  if (type == object_type::mutex && initial) in.set_owner_tid(detail::self().tid);
  auto reply = session_->call(request_type::create, in.SerializeAsString());
  if (!reply) return reply.error();
  pb::HandleReply out;
  if (!out.ParseFromString(reply->payload)) return make_error_code(errc::bad_request);
  // A mutex created owned is this thread's from the start: its exit abandons it.
  if (type == object_type::mutex && initial && !out.existed())
    detail::note_mutex_owned(session_->map->view, out.handle().index(), detail::self());
  return object(session_, {out.handle().index(), out.handle().generation()},
                static_cast<object_type>(out.type()), out.existed());
}

result<event> client::create_event(event_reset reset, bool initially_signalled,
                                   std::string_view name) {
  auto o =
      create(reset == event_reset::manual ? object_type::manual_event : object_type::auto_event,
             name, initially_signalled, 0, 0);
  if (!o) return o.error();
  return as_event(std::move(*o));
}

result<mutex> client::create_mutex(bool initially_owned, std::string_view name) {
  auto o = create(object_type::mutex, name, initially_owned, 0, 0);
  if (!o) return o.error();
  return as_mutex(std::move(*o));
}

result<semaphore> client::create_semaphore(std::uint32_t initial, std::uint32_t maximum,
                                           std::string_view name) {
  if (maximum == 0 || initial > maximum) return make_error_code(errc::invalid_argument);
  auto o = create(object_type::semaphore, name, false, initial, maximum);
  if (!o) return o.error();
  return as_semaphore(std::move(*o));
}

result<object> client::open(std::string_view name) {
  if (!session_) return make_error_code(errc::daemon_lost);
  if (name.empty()) return make_error_code(errc::invalid_argument);
  if (name.size() > max_name_length) return make_error_code(errc::name_too_long);
  pb::OpenRequest in;
  in.set_name(std::string(name));
  auto reply = session_->call(request_type::open, in.SerializeAsString());
  if (!reply) return reply.error();
  pb::HandleReply out;
  if (!out.ParseFromString(reply->payload)) return make_error_code(errc::bad_request);
  return object(session_, {out.handle().index(), out.handle().generation()},
                static_cast<object_type>(out.type()), true);
}

result<object> client::open(handle_id handle) {
  if (!session_) return make_error_code(errc::daemon_lost);
  pb::OpenRequest in;
  in.mutable_handle()->set_index(handle.index);
  in.mutable_handle()->set_generation(handle.generation);
  auto reply = session_->call(request_type::open, in.SerializeAsString());
  if (!reply) return reply.error();
  pb::HandleReply out;
  if (!out.ParseFromString(reply->payload)) return make_error_code(errc::bad_request);
  return object(session_, handle, static_cast<object_type>(out.type()), true);
}

error_code client::close(handle_id handle) {
  if (!session_) return make_error_code(errc::daemon_lost);
  pb::CloseRequest in;
  in.mutable_handle()->set_index(handle.index);
  in.mutable_handle()->set_generation(handle.generation);
  auto reply = session_->call(request_type::close, in.SerializeAsString());
  return reply ? error_code{} : reply.error();
}

result<event> client::open_event(std::string_view name) {
  auto o = open(name);
  if (!o) return o.error();
  return as_event(std::move(*o));
}
result<mutex> client::open_mutex(std::string_view name) {
  auto o = open(name);
  if (!o) return o.error();
  return as_mutex(std::move(*o));
}
result<semaphore> client::open_semaphore(std::string_view name) {
  auto o = open(name);
  if (!o) return o.error();
  return as_semaphore(std::move(*o));
}

// A wrong type gives the reference back at once (the object's destructor closes it).
result<event> client::as_event(object&& o) {
  if (o.type() != object_type::manual_event && o.type() != object_type::auto_event) {
    object dropped(std::move(o));
    return make_error_code(errc::wrong_type);
  }
  return event(std::move(o));
}
result<mutex> client::as_mutex(object&& o) {
  if (o.type() != object_type::mutex) {
    object dropped(std::move(o));
    return make_error_code(errc::wrong_type);
  }
  return mutex(std::move(o));
}
result<semaphore> client::as_semaphore(object&& o) {
  if (o.type() != object_type::semaphore) {
    object dropped(std::move(o));
    return make_error_code(errc::wrong_type);
  }
  return semaphore(std::move(o));
}

result<scratch_block> client::store_scratch(std::size_t bytes) {
  if (!session_) return make_error_code(errc::daemon_lost);
  pb::ScratchStoreRequest in;
  in.set_size(bytes);
  auto reply = session_->call(request_type::scratch_store, in.SerializeAsString());
  if (!reply) return reply.error();
  pb::ScratchStoreReply out;
  if (!out.ParseFromString(reply->payload)) return make_error_code(errc::bad_request);
  const auto& v = session_->map->view;
  if (out.offset() > v.scratch_size() || out.size() > v.scratch_size() - out.offset())
    return make_error_code(errc::bad_request);
  scratch_block b;
  b.session_ = session_;
  b.offset_ = out.offset();
  b.data_ = std::span<std::byte>(v.scratch + out.offset(), out.size());
  return b;
}

std::span<std::byte> client::scratch_area() const {
  if (!session_) return {};
  const auto& v = session_->map->view;
  return {v.scratch, v.scratch_size()};
}

result<wait_result> client::wait_many(std::span<const object* const> objects, bool all,
                                      std::chrono::nanoseconds timeout) {
  if (!session_) return make_error_code(errc::daemon_lost);
  if (objects.empty() || objects.size() > max_wait_objects)
    return make_error_code(errc::invalid_argument);
  if (!session_->usable()) return session_->map->lost_reason();
  // On the stack: a wait allocates nothing. Entry i is objects[position].
  struct entry {
    detail::wait_target target;
    std::size_t position;
  };
  boost::container::static_vector<entry, max_wait_objects> set;
  for (std::size_t i = 0; i < objects.size(); ++i) {
    const object* o = objects[i];
    if (o == nullptr || !*o) return make_error_code(errc::invalid_handle);
    if (o->session_ != session_) return make_error_code(errc::invalid_argument);
    auto s = detail::checked_slot(session_->map->view, o->handle(), object_type::none);
    if (!s) return s.error();
    set.push_back({{*s, o->type(), o->handle().generation}, i});
  }
  if (all) {
    // One lock order for every wait-all (by slot), so two of them never deadlock.
    std::sort(set.begin(), set.end(), [](const entry& a, const entry& b) { return a.target.s < b.target.s; });
    for (std::size_t i = 1; i < set.size(); ++i) {
      if (set[i].target.s == set[i - 1].target.s) return make_error_code(errc::invalid_argument);
    }
  }
  boost::container::static_vector<detail::wait_target, max_wait_objects> targets;
  for (const auto& e : set) targets.push_back(e.target);
  auto r = detail::wait(session_->map->view, std::span(targets.data(), targets.size()), all, timeout,
                        session_->options.spin);
  if (!r) return r.error();
  if (r->status != wait_status::timed_out) r->index = set[r->index].position;
  return r;
}

result<wait_result> client::wait_any(std::span<const object* const> objects,
                                     std::chrono::nanoseconds timeout) {
  return wait_many(objects, false, timeout);
}
result<wait_result> client::wait_any(std::initializer_list<const object*> objects,
                                     std::chrono::nanoseconds timeout) {
  return wait_many(std::span<const object* const>(objects.begin(), objects.size()), false, timeout);
}
result<wait_result> client::wait_all(std::span<const object* const> objects,
                                     std::chrono::nanoseconds timeout) {
  return wait_many(objects, true, timeout);
}
result<wait_result> client::wait_all(std::initializer_list<const object*> objects,
                                     std::chrono::nanoseconds timeout) {
  return wait_many(std::span<const object* const>(objects.begin(), objects.size()), true, timeout);
}

result<std::vector<handle_info>> client::list() {
  if (!session_) return make_error_code(errc::daemon_lost);
  std::vector<handle_info> entries;
  // Page by page (see ListRequest); each page is a consistent snapshot of its
  // slots, the whole list is not.
  for (std::uint32_t start = 0;;) {
    pb::ListRequest in;
    in.set_start_index(start);
    auto reply = session_->call(request_type::list, in.SerializeAsString());
    if (!reply) return reply.error();
    pb::ListReply out;
    if (!out.ParseFromString(reply->payload)) return make_error_code(errc::bad_request);
    for (const auto& e : out.entries()) {
      entries.push_back({{e.handle().index(), e.handle().generation()},
                         static_cast<object_type>(e.type()),
                         e.refcount(),
                         e.name(),
                         e.value()});
    }
    if (out.next_index() == 0) break;
    if (out.next_index() <= start) return make_error_code(errc::bad_request);  // no progress
    start = out.next_index();
  }
  return entries;
}

result<daemon_stats> client::stats() {
  if (!session_) return make_error_code(errc::daemon_lost);
  auto reply = session_->call(request_type::stats, pb::StatsRequest{}.SerializeAsString());
  if (!reply) return reply.error();
  pb::StatsReply out;
  if (!out.ParseFromString(reply->payload)) return make_error_code(errc::bad_request);
  daemon_stats s;
  s.capacity = out.capacity();
  s.handles_in_use = out.handles_in_use();
  s.clients = out.clients();
  s.scratch_size = out.scratch_size();
  s.scratch_in_use = out.scratch_in_use();
  s.scratch_blocks = out.scratch_blocks();
  s.requests = out.requests();
  s.errors = out.errors();
  s.mutexes_abandoned = out.mutexes_abandoned();
  s.daemon_pid = out.daemon_pid();
  return s;
}

result<std::vector<client_info>> client::clients() {
  if (!session_) return make_error_code(errc::daemon_lost);
  auto reply = session_->call(request_type::clients, pb::ClientsRequest{}.SerializeAsString());
  if (!reply) return reply.error();
  pb::ClientsReply out;
  if (!out.ParseFromString(reply->payload)) return make_error_code(errc::bad_request);
  std::vector<client_info> all;
  all.reserve(static_cast<std::size_t>(out.clients_size()));
  for (const auto& e : out.clients()) {
    all.push_back({e.session(), e.pid(), e.uid(), e.handles(), e.scratch_blocks()});
  }
  return all;
}

// ---- objects ----------------------------------------------------------------------

object::object(std::shared_ptr<detail::session> s, handle_id h, object_type t, bool existed)
    : session_(std::move(s)), handle_(h), type_(t), existed_(existed) {}

object::object(object&& other) noexcept
    : session_(std::move(other.session_)),
      handle_(other.handle_),
      type_(other.type_),
      existed_(other.existed_) {
  other.session_.reset();
}

object& object::operator=(object&& other) noexcept {
  if (this != &other) {
    close();
    session_ = std::move(other.session_);
    other.session_.reset();
    handle_ = other.handle_;
    type_ = other.type_;
    existed_ = other.existed_;
  }
  return *this;
}

object::~object() {
  if (session_ && session_->usable()) {
    pb::CloseRequest in;
    in.mutable_handle()->set_index(handle_.index);
    in.mutable_handle()->set_generation(handle_.generation);
    session_->post(request_type::close, in.SerializeAsString());
  }
}

error_code object::close() {
  if (!session_) return {};
  auto s = std::move(session_);
  session_.reset();
  if (!s->usable()) return s->map->lost_reason();
  pb::CloseRequest in;
  in.mutable_handle()->set_index(handle_.index);
  in.mutable_handle()->set_generation(handle_.generation);
  auto reply = s->call(request_type::close, in.SerializeAsString());
  return reply ? error_code{} : reply.error();
}

handle_id object::detach() noexcept {
  session_.reset();
  return handle_;
}

result<detail::slot*> object::checked(object_type expected) const {
  if (!session_) return make_error_code(errc::invalid_handle);
  if (!session_->usable()) return session_->map->lost_reason();
  return detail::checked_slot(session_->map->view, handle_, expected);
}

result<wait_status> object::wait(std::chrono::nanoseconds timeout) const {
  auto s = checked(type_);
  if (!s) return s.error();
  const detail::wait_target target{*s, type_, handle_.generation};
  auto r = detail::wait(session_->map->view, std::span(&target, 1), false, timeout,
                        session_->options.spin);
  if (!r) return r.error();
  return r->status;
}

error_code event::signal() const {
  auto s = checked(type_);
  if (!s) return s.error();
  return detail::signal_event(**s);
}

error_code event::reset() const {
  auto s = checked(type_);
  if (!s) return s.error();
  return detail::reset_event(**s);
}

error_code mutex::release() const {
  auto s = checked(object_type::mutex);
  if (!s) return s.error();
  return detail::release_mutex(**s);
}

result<std::uint32_t> semaphore::release(std::uint32_t count) const {
  auto s = checked(object_type::semaphore);
  if (!s) return s.error();
  return detail::release_semaphore(**s, count);
}

// ---- scratch ------------------------------------------------------------------------

scratch_block::scratch_block(scratch_block&& other) noexcept
    : session_(std::move(other.session_)), offset_(other.offset_), data_(other.data_) {
  other.session_.reset();
}

scratch_block& scratch_block::operator=(scratch_block&& other) noexcept {
  if (this != &other) {
    free();
    session_ = std::move(other.session_);
    other.session_.reset();
    offset_ = other.offset_;
    data_ = other.data_;
  }
  return *this;
}

scratch_block::~scratch_block() {
  if (session_ && session_->usable()) {
    pb::ScratchFreeRequest in;
    in.set_offset(offset_);
    session_->post(request_type::scratch_free, in.SerializeAsString());
  }
}

error_code scratch_block::free() {
  if (!session_) return {};
  auto s = std::move(session_);
  session_.reset();
  data_ = {};
  if (!s->usable()) return s->map->lost_reason();
  pb::ScratchFreeRequest in;
  in.set_offset(offset_);
  auto reply = s->call(request_type::scratch_free, in.SerializeAsString());
  return reply ? error_code{} : reply.error();
}

}  // namespace uipc::handles
