// The client's control calls: create, open, close, scratch, waits on several
// objects, list, stats, clients.
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
  auto reply = session_->call<pb::HandleReply>(request_type::create, in);
  if (!reply) return reply.error();
  const pb::HandleReply& out = *reply;
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
  auto reply = session_->call<pb::HandleReply>(request_type::open, in);
  if (!reply) return reply.error();
  const pb::HandleReply& out = *reply;
  return object(session_, {out.handle().index(), out.handle().generation()},
                static_cast<object_type>(out.type()), true);
}

result<object> client::open(handle_id handle) {
  if (!session_) return make_error_code(errc::daemon_lost);
  pb::OpenRequest in;
  in.mutable_handle()->set_index(handle.index);
  in.mutable_handle()->set_generation(handle.generation);
  auto reply = session_->call<pb::HandleReply>(request_type::open, in);
  if (!reply) return reply.error();
  const pb::HandleReply& out = *reply;
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
  auto reply = session_->call<pb::ScratchStoreReply>(request_type::scratch_store, in);
  if (!reply) return reply.error();
  const pb::ScratchStoreReply& out = *reply;
  const auto& v = session_->map->view;
  if (out.offset() > v.scratch_size() || out.size() > v.scratch_size() - out.offset())
    return make_error_code(uipc::errc::bad_reply);
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

error_code client::build_wait_set(std::span<const object* const> objects, bool all,
                                  detail::wait_set& set) const {
  if (!session_) return make_error_code(errc::daemon_lost);
  if (objects.empty() || objects.size() > max_wait_objects)
    return make_error_code(errc::invalid_argument);
  if (!session_->usable()) return session_->map->lost_reason();
  for (std::size_t i = 0; i < objects.size(); ++i) {
    const object* o = objects[i];
    if (o == nullptr || !*o) return make_error_code(errc::invalid_handle);
    if (o->session_ != session_) return make_error_code(errc::invalid_argument);
    auto s = detail::checked_slot(session_->map->view, o->handle(), object_type::none);
    if (!s) return s.error();
    set.push_back({{*s, o->type(), o->handle().generation}, i});
  }
  if (all) {
    std::sort(set.begin(), set.end(), [](const detail::wait_entry& a, const detail::wait_entry& b) {
      return a.target.s < b.target.s;
    });
    for (std::size_t i = 1; i < set.size(); ++i) {
      if (set[i].target.s == set[i - 1].target.s) return make_error_code(errc::invalid_argument);
    }
  }
  return {};
}

result<wait_result> client::wait_many(std::span<const object* const> objects, bool all,
                                      std::chrono::nanoseconds timeout) {
  detail::wait_set set;
  if (auto ec = build_wait_set(objects, all, set)) return ec;
  boost::container::static_vector<detail::wait_target, max_wait_objects> targets;
  for (const auto& e : set) targets.push_back(e.target);
  auto r = detail::wait(session_->map->view, std::span(targets.data(), targets.size()), all,
                        timeout, session_->options.spin);
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
    auto reply = session_->call<pb::ListReply>(request_type::list, in);
    if (!reply) return reply.error();
    const pb::ListReply& out = *reply;
    for (const auto& e : out.entries()) {
      entries.push_back({{e.handle().index(), e.handle().generation()},
                         static_cast<object_type>(e.type()),
                         e.refcount(),
                         e.name(),
                         e.value()});
    }
    if (out.next_index() == 0) break;
    if (out.next_index() <= start) return make_error_code(uipc::errc::bad_reply);  // no progress
    start = out.next_index();
  }
  return entries;
}

result<daemon_stats> client::stats() {
  if (!session_) return make_error_code(errc::daemon_lost);
  auto reply = session_->call<pb::StatsReply>(request_type::stats, pb::StatsRequest{});
  if (!reply) return reply.error();
  const pb::StatsReply& out = *reply;
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
  auto reply = session_->call<pb::ClientsReply>(request_type::clients, pb::ClientsRequest{});
  if (!reply) return reply.error();
  const pb::ClientsReply& out = *reply;
  std::vector<client_info> all;
  all.reserve(static_cast<std::size_t>(out.clients_size()));
  for (const auto& e : out.clients()) {
    all.push_back({e.session(), e.pid(), e.uid(), e.handles(), e.scratch_blocks()});
  }
  return all;
}

}  // namespace uipc::handles
