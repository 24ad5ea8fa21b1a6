// The service: registration, the answers (reply, reject) and the facade.
// The control line is in service_control.cpp, the receiver in
// service_receive.cpp; the state they share in service_impl.hpp.
#include "uipc/caps/service.hpp"

#include <sys/epoll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <chrono>
#include <cstring>
#include <utility>

#include "points_dir.hpp"
#include "service_impl.hpp"
#include "uipc/proto/caps.pb.h"

namespace uipc::caps {

namespace asio = boost::asio;
using detail::duplicate;
using detail::make_eventfd;
using detail::system_error;

const peer_identity& event::sender() const noexcept {
  static const peer_identity nobody{};
  return channel_ ? channel_->session->peer() : nobody;
}

std::span<const std::byte> event::view() const noexcept { return {data_, length_}; }

std::string event::copy() const { return {reinterpret_cast<const char*>(data_), length_}; }

// ---- answers -------------------------------------------------------------------

result<std::uint64_t> service::impl::begin_reply(server_channel& ch, message_id id,
                                                 std::size_t size, const std::byte* copy_from) {
  for (int attempt = 0;; ++attempt) {
    std::unique_lock lock(ch.state_mutex);
    if (ch.closed) return make_error_code(errc::disconnected);
    auto m = ch.messages.find(id);
    if (m == ch.messages.end() || m->second.state == server_channel::message_state::replied ||
        m->second.state == server_channel::message_state::replying) {
      return make_error_code(errc::unknown_message);
    }
    if (m->second.state == server_channel::message_state::withdrawn) {
      // With a block, another thread's answer is being written into it: its
      // reply ends the message (the client disposes of it unseen).
      if (m->second.has_block) return make_error_code(errc::withdrawn);
      lock.unlock();
      finish(ch, id, detail::entry_kind::aborted, 0, 0, 0);
      return make_error_code(errc::withdrawn);
    }
    if (size > ch.reply_space.size()) return make_error_code(errc::message_too_large);
    if (auto offset = ch.reply_space.allocate(size)) {
      m->second.state = server_channel::message_state::replying;
      m->second.reply_offset = *offset;
      m->second.has_block = true;
      if (copy_from == nullptr) return *offset;
      // Our own copy, not user code: the reply is published under this lock.
      if (size > 0) std::memcpy(ch.reply_arena + *offset, copy_from, size);
      if (auto ec = publish(ch, m, detail::entry_kind::reply, 0, *offset, size)) return ec;
      lock.unlock();
      ch.wake_client();
      return *offset;
    }
    if (attempt > 0) return make_error_code(errc::no_buffers);
    lock.unlock();
    // Disposals the client published free blocks: read them (as a receiver
    // does: events queued and counted, a violation ends the client), then try
    // again.
    if (drain(ch.shared_from_this()) > 0) {
      // Queued outside the receiver's sweep: a receiver asleep on the bells
      // must look at the queue.
      const eventfd_t one = 1;
      (void)::eventfd_write(control_bell.get(), one);
    }
  }
}

error_code service::impl::publish(server_channel& ch, server_channel::message_table::iterator m,
                                  detail::entry_kind kind, std::uint32_t status,
                                  std::uint64_t offset, std::uint64_t length) {
  const auto free = ch.to_client.free_entries();
  if (!free || *free == 0) {
    if (m->second.has_block) ch.reply_space.free(m->second.reply_offset);
    m->second.has_block = false;
    if (m->second.state == server_channel::message_state::replying) {
      m->second.state = server_channel::message_state::delivered;
    }
    return make_error_code(free ? errc::no_buffers : errc::protocol_violation);
  }
  ch.to_client.put({static_cast<std::uint32_t>(kind), status, m->first, offset, length});
  --ch.awaiting;
  if (kind == detail::entry_kind::reply) {
    m->second.state = server_channel::message_state::replied;
  } else {
    ch.messages.erase(m);
  }
  return {};
}

error_code service::impl::finish(server_channel& ch, message_id id, detail::entry_kind kind,
                                 std::uint32_t status, std::uint64_t offset, std::uint64_t length) {
  {
    std::lock_guard lock(ch.state_mutex);
    if (ch.closed) return make_error_code(errc::disconnected);
    auto m = ch.messages.find(id);
    if (m == ch.messages.end()) return make_error_code(errc::unknown_message);
    if (auto ec = publish(ch, m, kind, status, offset, length)) return ec;
  }
  ch.wake_client();
  return {};
}

error_code service::impl::answer_on(server_channel& ch, message_id id, std::size_t size,
                                    const std::function<void(std::span<std::byte>)>& fill,
                                    const std::byte* copy_from) {
  auto offset = begin_reply(ch, id, size, copy_from);
  if (!offset) return offset.error();
  if (copy_from == nullptr) {
    try {
      fill(std::span(ch.reply_arena + *offset, size));
    } catch (...) {
      give_up_reply(ch, id, *offset);
      throw;
    }
    if (auto ec = finish(ch, id, detail::entry_kind::reply, 0, *offset, size)) return ec;
  }
  counters.replies.fetch_add(1, std::memory_order_relaxed);
  return {};
}

void service::impl::give_up_reply(server_channel& ch, message_id id, std::uint64_t offset) {
  using state = server_channel::message_state;
  {
    std::lock_guard lock(ch.state_mutex);
    auto m = ch.messages.find(id);
    if (m == ch.messages.end() || !m->second.has_block || m->second.reply_offset != offset) return;
    ch.reply_space.free(offset);
    m->second.has_block = false;
    if (m->second.state == state::replying) {
      m->second.state = state::delivered;  // to be answered again, or rejected
      return;
    }
    if (m->second.state != state::withdrawn || ch.closed) return;
    // Withdrawn while we filled: nobody else ends it now.
    if (publish(ch, m, detail::entry_kind::aborted, 0, 0, 0)) return;
  }
  ch.wake_client();
}

error_code service::impl::reply_bytes(server_channel& ch, message_id id,
                                      std::span<const std::byte> bytes) {
  static const std::byte nothing{};  // copy_from is never null for a copy, even of nothing
  return answer_on(ch, id, bytes.size(), {}, bytes.empty() ? &nothing : bytes.data());
}

result<std::shared_ptr<server_channel>> service::impl::channel_for(client_id client) const {
  if (fork.forked_copy()) return make_error_code(errc::forked_copy);
  auto ch = find(client);
  if (!ch) return make_error_code(errc::disconnected);
  return ch;
}

result<server_channel*> service::impl::channel_of(const event& request) const {
  if (fork.forked_copy()) return make_error_code(errc::forked_copy);
  server_channel* ch = request.channel_.get();
  if (request.kind != event_kind::request || ch == nullptr || ch->owner != this)
    return make_error_code(errc::unknown_message);
  return ch;
}

error_code service::impl::reject_on(server_channel& ch, message_id id, errc ec) {
  using state = server_channel::message_state;
  bool withdrawn = false;
  {
    std::lock_guard lock(ch.state_mutex);
    auto m = ch.messages.find(id);
    if (m == ch.messages.end() || m->second.state == state::replied ||
        m->second.state == state::replying) {
      return make_error_code(errc::unknown_message);
    }
    withdrawn = m->second.state == state::withdrawn;
    // Being answered by another thread: its reply ends the message.
    if (withdrawn && m->second.has_block) return make_error_code(errc::withdrawn);
  }
  if (withdrawn) {
    (void)finish(ch, id, detail::entry_kind::aborted, 0, 0, 0);
    return make_error_code(errc::withdrawn);
  }
  return finish(ch, id, detail::entry_kind::failed, static_cast<std::uint32_t>(ec), 0, 0);
}

void service::impl::stop() {
  if (stopped.exchange(true)) return;
  if (srv) srv->stop();  // ends every session: session_ended for each (not in a forked copy)
  fail_async(make_error_code(errc::stopped));
  if (!fork.forked_copy()) {  // the bell and the point's files are the parent's
    const eventfd_t one = 1;
    (void)::eventfd_write(control_bell.get(), one);
    ::unlink(detail::info_path(socket_path).c_str());
  }
  name_lock.reset();
}

// ---- registration and the facade -----------------------------------------------

result<std::unique_ptr<service>> service::register_point(asio::io_context& ctx,
                                                         std::string_view name,
                                                         service_options options) {
  if (auto ec = check_name(name, point_name_rules)) return ec;
  if (options.max_in_flight == 0 || options.max_in_flight > detail::max_in_flight_limit) {
    return make_error_code(boost::system::errc::invalid_argument);
  }
  auto base = detail::base_directory(options.directory);
  if (!base) return base.error();
  auto dir = detail::own_points_directory(*base);
  if (!dir) return dir.error();
  auto lock = detail::lock_name(*dir, name, options.exclusive);
  if (!lock) return lock.error();
  detail::reclaim_dead_instances(*dir, name);

  auto p = std::make_shared<impl>(ctx, options);
  p->registration.hold(p);
  p->name = std::string(name);
  p->name_lock = std::move(*lock);
  static std::atomic<std::uint32_t> instances{0};
  p->socket_path = *dir + "/" + p->name + "@" + std::to_string(::getpid()) + "." +
                   std::to_string(instances.fetch_add(1)) + ".sock";
  p->info.name = p->name;
  p->info.uid = ::geteuid();
  p->info.gid = options.gid.value_or(::getegid());
  p->info.who = options.who;
  p->info.exclusive = options.exclusive;
  p->info.pid = ::getpid();
  p->info.generation =
      static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                     std::chrono::system_clock::now().time_since_epoch())
                                     .count());
  p->info.socket_path = p->socket_path;

  p->epoll.reset(::epoll_create1(EPOLL_CLOEXEC));
  p->control_bell = make_eventfd();
  if (!p->epoll || !p->control_bell) return system_error();
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = 0;  // session ids are never 0
  if (::epoll_ctl(p->epoll.get(), EPOLL_CTL_ADD, p->control_bell.get(), &ev) != 0)
    return system_error();
  boost::system::error_code assign_ec;
  p->epoll_desc.assign(duplicate(p->epoll.get()).release(), assign_ec);
  if (assign_ec) return assign_ec;

  p->router.on<proto::caps::Hello, proto::caps::Hello>(
      proto::caps::HELLO,
      [](request_context&, const proto::caps::Hello&) -> result<proto::caps::Hello> { return {}; },
      request_router::notices::served);

  server_options so;
  so.listen.mode = options.who == access::world ? 0666 : options.who == access::group ? 0660 : 0600;
  so.listen.connection.peer_sends_fds = false;
  so.max_sessions = options.max_clients;
  std::weak_ptr<impl> weak = p;
  so.admit = [weak](const peer_identity& peer) -> error_code {
    auto self = weak.lock();
    return self ? self->admit(peer) : make_error_code(errc::stopped);
  };
  so.on_session_start = [weak](const std::shared_ptr<server_session>& s) {
    if (auto self = weak.lock()) self->session_started(s);
  };
  so.on_session_end = [weak](server_session& s, error_code) {
    if (auto self = weak.lock()) self->session_ended(s);
  };
  auto srv = server::start(ctx, p->socket_path, p->router, std::move(so));
  if (!srv) return srv.error();
  p->srv = std::move(*srv);
  if (options.gid && ::chown(p->socket_path.c_str(), static_cast<uid_t>(-1), *options.gid) != 0) {
    const auto ec = system_error();
    p->stop();
    return ec;
  }
  if (auto ec = p->publish_info()) {
    p->stop();
    return ec;
  }
  return std::unique_ptr<service>(new service(std::move(p)));
}

service::service(std::shared_ptr<impl> p) : impl_(std::move(p)) {}
service::~service() { impl_->stop(); }

result<event> service::receive(clock::time_point deadline) {
  return impl_->receive(deadline, nullptr, nullptr, true);
}

result<event> service::receive_into(std::span<std::byte> buffer, std::size_t& size,
                                    clock::time_point deadline) {
  return impl_->receive(deadline, &buffer, &size, true);
}

result<event> service::try_receive() {
  return impl_->receive(clock::now(), nullptr, nullptr, false);
}

void service::start_receive(receive_handler handler) {
  {
    std::lock_guard lock(impl_->async_mutex);
    impl_->async_waiters.push_back(std::move(handler));
  }
  if (impl_->stopped.load()) return impl_->fail_async(make_error_code(errc::stopped));
  if (impl_->fork.forked_copy()) return impl_->fail_async(make_error_code(errc::forked_copy));
  asio::post(impl_->ctx, [self = impl_] { self->serve_async(); });
}

error_code service::reply(client_id client, message_id id, std::span<const std::byte> bytes) {
  auto ch = impl_->channel_for(client);
  return ch ? impl_->reply_bytes(**ch, id, bytes) : ch.error();
}

error_code service::reply_in_place(client_id client, message_id id, std::size_t size,
                                   const std::function<void(std::span<std::byte>)>& fill) {
  auto ch = impl_->channel_for(client);
  return ch ? impl_->answer_on(**ch, id, size, fill, nullptr) : ch.error();
}

error_code service::reject(client_id client, message_id id, errc ec) {
  auto ch = impl_->channel_for(client);
  return ch ? impl_->reject_on(**ch, id, ec) : ch.error();
}

error_code service::reply(const event& request, std::span<const std::byte> bytes) {
  auto ch = impl_->channel_of(request);
  return ch ? impl_->reply_bytes(**ch, request.id, bytes) : ch.error();
}

error_code service::reply_in_place(const event& request, std::size_t size,
                                   const std::function<void(std::span<std::byte>)>& fill) {
  auto ch = impl_->channel_of(request);
  return ch ? impl_->answer_on(**ch, request.id, size, fill, nullptr) : ch.error();
}

error_code service::reject(const event& request, errc ec) {
  auto ch = impl_->channel_of(request);
  return ch ? impl_->reject_on(**ch, request.id, ec) : ch.error();
}

void service::disconnect(client_id client) {
  if (auto ch = impl_->find(client)) ch->session->close();
}

void service::stop() { impl_->stop(); }

std::uint64_t service::generation() const noexcept { return impl_->info.generation; }
const std::string& service::socket_path() const noexcept { return impl_->socket_path; }
const std::string& service::name() const noexcept { return impl_->name; }

service_stats service::stats() const {
  service_stats s;
  {
    std::lock_guard lock(impl_->channels_mutex);
    s.clients = impl_->channels.size();
  }
  const auto& c = impl_->counters;
  s.clients_total = c.clients_total.load();
  s.requests = c.requests.load();
  s.replies = c.replies.load();
  s.disposals = c.disposals.load();
  s.withdrawals = c.withdrawals.load();
  s.protocol_violations = c.violations.load();
  s.refusals = c.refusals.load();
  s.doorbells = c.doorbells.load();
  return s;
}

}  // namespace uipc::caps
