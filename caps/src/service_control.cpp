// The service's control line, on the loop threads: admission by the
// client's credentials, the channel set up for each session and torn down
// when it ends, the published point information.
#include <sys/epoll.h>

#include "bell.hpp"
#include "points_dir.hpp"
#include "service_impl.hpp"
#include "uipc/proto/caps.pb.h"

namespace uipc::caps {

using detail::duplicate;
using detail::error_notice;
using detail::system_error;

error_code service::impl::admit(const peer_identity& peer) {
  bool ok = peer.uid == info.uid;
  if (options.who == access::group) ok = ok || peer.in_group(info.gid);
  if (options.who == access::world) ok = true;
  if (!ok) {
    counters.refusals.fetch_add(1, std::memory_order_relaxed);
    return make_error_code(uipc::errc::permission_denied);
  }
  // Ended clients whose events the application has not received yet count.
  if (channels_alive->load(std::memory_order_relaxed) >= options.max_clients)
    return make_error_code(errc::no_buffers);
  return {};
}

void service::impl::session_started(const std::shared_ptr<server_session>& session) {
  auto ch = open_channel(session);
  if (!ch) {
    (void)session->send(error_notice(ch.error()));
    session->close();
    return;
  }
  // The connected event is queued before the channel can be read: it comes
  // before any request of the client.
  counters.clients_total.fetch_add(1, std::memory_order_relaxed);
  {
    std::lock_guard lock(channels_mutex);
    channels.emplace(session->id(), *ch);
  }
  (void)publish_info();
  push_events({(*ch)->make_event(event_kind::connected)});
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = session->id();
  ::epoll_ctl(epoll.get(), EPOLL_CTL_ADD, (*ch)->bell.get(), &ev);
}

result<std::shared_ptr<server_channel>> service::impl::open_channel(
    const std::shared_ptr<server_session>& session) {
  const auto layout = detail::channel_layout::of(options.request_arena, options.reply_arena);
  auto segment =
      shm_segment::create_anonymous(layout.total, {detail::channel_magic, detail::channel_version});
  if (!segment) return segment.error();
  auto bells = detail::make_bell_pair();
  if (!bells) return bells.error();
  unique_fd memfd = duplicate(segment->fd());
  if (!memfd) return system_error();
  auto ch = std::make_shared<server_channel>(session, std::move(*segment), layout,
                                             options.max_in_flight, std::move(bells->ours));
  ch->counted.count = channels_alive;
  channels_alive->fetch_add(1, std::memory_order_relaxed);
  ch->owner = this;
  proto::caps::Welcome w;
  w.set_version(detail::channel_version);
  w.set_generation(info.generation);
  w.set_gid(info.gid);
  w.set_access(static_cast<proto::caps::Access>(options.who));
  w.set_exclusive(options.exclusive);
  w.set_max_in_flight(options.max_in_flight);
  w.set_request_arena(layout.request_arena_size);
  w.set_reply_arena(layout.reply_arena_size);
  w.set_client_id(session->id());
  frame f;
  f.kind = frame_kind::notice;
  f.type = proto::caps::WELCOME;
  f.payload = w.SerializeAsString();
  f.fds.push_back(std::move(memfd));
  f.fds.push_back(std::move(bells->theirs));
  if (auto ec = session->send(std::move(f))) return ec;
  return ch;
}

void service::impl::session_ended(server_session& session) {
  std::shared_ptr<server_channel> ch;
  {
    std::lock_guard lock(channels_mutex);
    auto it = channels.find(session.id());
    if (it == channels.end()) return;
    ch = std::move(it->second);
    channels.erase(it);
  }
  ::epoll_ctl(epoll.get(), EPOLL_CTL_DEL, ch->bell.get(), nullptr);
  std::vector<event> events;
  {
    std::lock_guard read_lock(ch->read_mutex);  // after any drain in progress
    ch->read_closed = true;
    std::lock_guard lock(ch->state_mutex);
    ch->closed = true;
    for (auto& [id, m] : ch->messages) events.push_back(ch->make_event(event_kind::dispose, id));
    ch->messages.clear();
    ch->awaiting = 0;
  }
  ch->shared->server_closed.store(1, std::memory_order_seq_cst);
  ch->wake_client();
  // A client that came and went without a message, its connected event still
  // unreceived, is not reported at all: the channel goes now, not when the
  // application gets round to the queue.
  if (events.empty() && withdraw_unseen_arrival(*ch)) {
    (void)publish_info();
    return;
  }
  events.push_back(ch->make_event(event_kind::disconnected));
  (void)publish_info();
  push_events(std::move(events));
}

bool service::impl::withdraw_unseen_arrival(const server_channel& ch) {
  std::lock_guard lock(queue_mutex);
  auto arrival = queue.end();
  for (auto it = queue.begin(); it != queue.end(); ++it) {
    if (it->channel_.get() != &ch) continue;
    if (it->kind != event_kind::connected || arrival != queue.end()) return false;
    arrival = it;
  }
  if (arrival == queue.end()) return false;
  queue.erase(arrival);
  queued.store(queue.size(), std::memory_order_release);
  return true;
}

error_code service::impl::publish_info() {
  std::lock_guard lock(info_mutex);
  point_info now = info;
  {
    std::lock_guard channels_lock(channels_mutex);
    now.clients = channels.size();
  }
  return detail::write_info(now);
}

void service::impl::push_events(std::vector<event> events) {
  {
    std::lock_guard lock(queue_mutex);
    for (auto& e : events) queue.push_back(std::move(e));
    queued.store(queue.size(), std::memory_order_release);
  }
  const eventfd_t one = 1;
  (void)::eventfd_write(control_bell.get(), one);
}

void service::impl::violation(const std::shared_ptr<server_channel>& ch) {
  counters.violations.fetch_add(1, std::memory_order_relaxed);
  // The notice goes if the client's socket takes it now; the close does not
  // wait for it (a client that stopped reading would keep its session, its
  // channel and its queued replies for ever).
  auto conn = ch->session->conn();
  (void)conn->send(error_notice(make_error_code(errc::protocol_violation)));
  conn->close();
}

std::shared_ptr<server_channel> service::impl::find(client_id client) const {
  std::lock_guard lock(channels_mutex);
  auto it = channels.find(client);
  return it == channels.end() ? nullptr : it->second;
}

}  // namespace uipc::caps
