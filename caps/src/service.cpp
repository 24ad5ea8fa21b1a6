// The service: registration, the control line of each client (on the server
// kit), and the receiver that reads the clients' channels.
#include "uipc/caps/service.hpp"

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <utility>

#include "completion.hpp"
#include "fork_guard.hpp"
#include "points_dir.hpp"
#include "server_channel.hpp"
#include "uipc/core/wait_policy.hpp"
#include "uipc/proto/caps.pb.h"

namespace uipc::caps {

namespace asio = boost::asio;
using detail::server_channel;

const peer_identity& event::sender() const noexcept {
  static const peer_identity nobody{};
  return channel_ ? channel_->session->peer() : nobody;
}

std::span<const std::byte> event::view() const noexcept { return {data_, length_}; }

std::string event::copy() const { return {reinterpret_cast<const char*>(data_), length_}; }

namespace {

error_code system_error() { return {errno, boost::system::system_category()}; }

unique_fd make_eventfd() { return unique_fd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)); }

unique_fd duplicate(int fd) { return unique_fd(::fcntl(fd, F_DUPFD_CLOEXEC, 0)); }

void clear_eventfd(int fd) {
  eventfd_t value;
  (void)::read(fd, &value, sizeof value);
}

frame error_notice(error_code ec) {
  frame f;
  f.kind = frame_kind::notice;
  f.error = to_wire_error(ec);
  return f;
}

}  // namespace

struct service::impl : std::enable_shared_from_this<impl> {
  impl(asio::io_context& c, service_options o) : ctx(c), options(std::move(o)), epoll_desc(c) {}

  asio::io_context& ctx;
  service_options options;
  std::string name;
  std::string socket_path;
  unique_fd name_lock;
  point_info info;
  std::uint64_t epoch = detail::fork_epoch();
  request_router router;
  std::unique_ptr<server> srv;
  unique_fd epoll;
  unique_fd control_bell;  // rung when control events wait in the queue
  asio::posix::stream_descriptor epoll_desc;

  mutable std::mutex channels_mutex;
  std::unordered_map<client_id, std::shared_ptr<server_channel>> channels;

  std::mutex queue_mutex;
  std::deque<event> queue;

  // Receivers take turns. A flag under a plain mutex, not std::timed_mutex:
  // its timed lock (pthread_mutex_clocklock) is invisible to ThreadSanitizer.
  class turn {
   public:
    bool try_lock() {
      std::lock_guard lock(mutex_);
      return !std::exchange(taken_, true);
    }
    bool try_lock_until(clock::time_point deadline) {
      std::unique_lock lock(mutex_);
      const auto free = [this] { return !taken_; };
      if (deadline == clock::time_point::max()) {
        freed_.wait(lock, free);  // a wait_until(max) would overflow converting clocks
      } else if (!freed_.wait_until(lock, deadline, free)) {
        return false;
      }
      taken_ = true;
      return true;
    }
    void unlock() {
      {
        std::lock_guard lock(mutex_);
        taken_ = false;
      }
      freed_.notify_one();
    }

   private:
    std::mutex mutex_;
    std::condition_variable freed_;
    bool taken_ = false;
  };
  turn pump_mutex;
  std::vector<std::shared_ptr<server_channel>> hot;
  std::uint32_t sweeps_since_poll = 0;

  std::mutex async_mutex;
  std::deque<receive_handler> async_waiters;
  bool async_armed = false;

  std::atomic<bool> stopped{false};
  struct counters {
    std::atomic<std::uint64_t> clients_total{0}, requests{0}, replies{0}, disposals{0},
        withdrawals{0}, violations{0}, refusals{0}, doorbells{0};
  } counters;

  // ---- control line (loop threads) ----------------------------------------------

  error_code admit(const peer_identity& peer) {
    bool ok = peer.uid == info.uid;
    if (options.who == access::group) ok = ok || peer.in_group(info.gid);
    if (options.who == access::world) ok = true;
    if (ok) return {};
    counters.refusals.fetch_add(1, std::memory_order_relaxed);
    return make_error_code(uipc::errc::permission_denied);
  }

  void session_started(const std::shared_ptr<server_session>& session) {
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
    ::epoll_ctl(epoll.get(), EPOLL_CTL_ADD, (*ch)->server_bell.get(), &ev);
  }

  result<std::shared_ptr<server_channel>> open_channel(
      const std::shared_ptr<server_session>& session) {
    const auto layout = detail::channel_layout::of(options.request_arena, options.reply_arena);
    auto segment = shm_segment::create_anonymous(layout.total,
                                                 {detail::channel_magic, detail::channel_version});
    if (!segment) return segment.error();
    unique_fd server_bell = make_eventfd(), client_bell = make_eventfd();
    if (!server_bell || !client_bell) return system_error();
    unique_fd memfd = duplicate(segment->fd()), server_bell_copy = duplicate(server_bell.get()),
              client_bell_copy = duplicate(client_bell.get());
    if (!memfd || !server_bell_copy || !client_bell_copy) return system_error();
    auto ch = std::make_shared<server_channel>(session, std::move(*segment), layout,
                                               options.max_in_flight, std::move(server_bell),
                                               std::move(client_bell));
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
    f.fds.push_back(std::move(server_bell_copy));
    f.fds.push_back(std::move(client_bell_copy));
    if (auto ec = session->send(std::move(f))) return ec;
    return ch;
  }

  void session_ended(server_session& session) {
    std::shared_ptr<server_channel> ch;
    {
      std::lock_guard lock(channels_mutex);
      auto it = channels.find(session.id());
      if (it == channels.end()) return;
      ch = std::move(it->second);
      channels.erase(it);
    }
    ::epoll_ctl(epoll.get(), EPOLL_CTL_DEL, ch->server_bell.get(), nullptr);
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
    events.push_back(ch->make_event(event_kind::disconnected));
    (void)publish_info();
    push_events(std::move(events));
  }

  // One writer at a time: a client that connects while register_point() still
  // publishes would otherwise race it for the file written aside.
  error_code publish_info() {
    std::lock_guard lock(info_mutex);
    point_info now = info;
    {
      std::lock_guard channels_lock(channels_mutex);
      now.clients = channels.size();
    }
    return detail::write_info(now);
  }
  std::mutex info_mutex;

  // Queues events from a loop thread and wakes the receiver.
  void push_events(std::vector<event> events) {
    {
      std::lock_guard lock(queue_mutex);
      for (auto& e : events) queue.push_back(std::move(e));
    }
    const eventfd_t one = 1;
    (void)::write(control_bell.get(), &one, sizeof one);
  }

  // A client that broke the channel protocol loses its connection.
  void violation(const std::shared_ptr<server_channel>& ch) {
    counters.violations.fetch_add(1, std::memory_order_relaxed);
    auto conn = ch->session->conn();
    conn->async_send(error_notice(make_error_code(errc::protocol_violation)),
                     [conn](error_code) { conn->close(); });
  }

  std::shared_ptr<server_channel> find(client_id client) const {
    std::lock_guard lock(channels_mutex);
    auto it = channels.find(client);
    return it == channels.end() ? nullptr : it->second;
  }

  // ---- the receiver (pump lock held) ----------------------------------------------

  // Reads one channel into the queue. Returns how many events it gave.
  std::size_t drain(const std::shared_ptr<server_channel>& ch) {
    thread_local std::vector<event> events;  // reused: no allocation per drain
    events.clear();
    bool ok;
    {
      std::lock_guard lock(ch->read_mutex);
      if (ch->read_closed) return 0;
      ok = ch->drain(events);
      if (!ok) ch->read_closed = true;
      if (!events.empty()) {
        std::lock_guard qlock(queue_mutex);
        for (auto& e : events) {
          if (e.kind == event_kind::request)
            counters.requests.fetch_add(1, std::memory_order_relaxed);
          if (e.kind == event_kind::dispose)
            counters.disposals.fetch_add(1, std::memory_order_relaxed);
          if (e.kind == event_kind::withdrawn)
            counters.withdrawals.fetch_add(1, std::memory_order_relaxed);
          queue.push_back(std::move(e));
        }
      }
    }
    const std::size_t n = events.size();
    events.clear();  // the channel references go now, not at the next drain
    if (!ok) violation(ch);
    return n;
  }

  void make_hot(const std::shared_ptr<server_channel>& ch) {
    ch->idle_sweeps = 0;
    if (ch->hot) return;
    ch->hot = true;
    ch->shared->server_watching.store(1, std::memory_order_seq_cst);
    hot.push_back(ch);
  }

  // Stops watching a channel; false (and it stays watched) if it has work.
  bool cool(server_channel& ch) {
    ch.shared->server_watching.store(0, std::memory_order_seq_cst);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (ch.maybe_ready() && !ch.read_closed) {
      ch.shared->server_watching.store(1, std::memory_order_seq_cst);
      return false;
    }
    ch.hot = false;
    return true;
  }

  // Reads the watched channels; now and then (or when they are quiet) also
  // the doorbells of the others, so a busy channel never starves a quiet one.
  std::size_t sweep() {
    std::size_t found = 0;
    for (std::size_t i = 0; i < hot.size();) {
      auto& ch = hot[i];
      const std::size_t n = ch->read_closed ? 0 : drain(ch);
      found += n;
      if (ch->read_closed || (n == 0 && ++ch->idle_sweeps > 4096 && cool(*ch))) {
        ch->hot = false;
        hot[i] = std::move(hot.back());
        hot.pop_back();
        continue;
      }
      if (n > 0) ch->idle_sweeps = 0;
      ++i;
    }
    if (found == 0 || ++sweeps_since_poll >= 64) {
      sweeps_since_poll = 0;
      found += poll_bells(0);
    }
    return found;
  }

  // Waits up to `timeout_ms` (-1: forever) for doorbells; answers those rung.
  std::size_t poll_bells(int timeout_ms) {
    epoll_event ready[64];
    const int n = ::epoll_wait(epoll.get(), ready, 64, timeout_ms);
    std::size_t found = 0;
    for (int i = 0; i < n; ++i) {
      if (ready[i].data.u64 == 0) {
        clear_eventfd(control_bell.get());
        ++found;  // the queue may have grown
        continue;
      }
      auto ch = find(ready[i].data.u64);
      if (!ch) continue;
      clear_eventfd(ch->server_bell.get());
      if (timeout_ms != 0) counters.doorbells.fetch_add(1, std::memory_order_relaxed);
      make_hot(ch);
      found += drain(ch);
    }
    return found;
  }

  // Before sleeping: stop watching every channel, unless one has work.
  bool quiesce() {
    for (auto& ch : hot) {
      if (!cool(*ch)) {
        for (auto& other : hot) {
          if (!other->hot) {
            other->hot = true;
            other->shared->server_watching.store(1, std::memory_order_seq_cst);
          }
        }
        return false;
      }
    }
    hot.clear();
    return true;
  }

  bool any_hot_ready() const noexcept {
    for (const auto& ch : hot) {
      if (ch->maybe_ready()) return true;
    }
    return false;
  }

  // The front of the queue, unless it is a request too large for `into`.
  result<event> pop(std::span<std::byte>* into, std::size_t* size) {
    std::lock_guard lock(queue_mutex);
    if (queue.empty()) return make_error_code(uipc::errc::timed_out);
    event& front = queue.front();
    if (into != nullptr && front.kind == event_kind::request) {
      *size = front.length_;
      if (front.length_ > into->size()) return make_error_code(errc::buffer_too_small);
      std::memcpy(into->data(), front.data_, front.length_);
      front.data_ = into->data();
    }
    event e = std::move(front);
    queue.pop_front();
    return e;
  }

  bool queue_empty() {
    std::lock_guard lock(queue_mutex);
    return queue.empty();
  }

  result<event> receive(clock::time_point deadline, std::span<std::byte>* into, std::size_t* size,
                        bool wait) {
    if (epoch != detail::fork_epoch()) return make_error_code(errc::forked_copy);
    std::unique_lock pump(pump_mutex, std::defer_lock);
    if (!pump.try_lock_until(deadline)) return make_error_code(uipc::errc::timed_out);
    auto& policy = wait_policy::this_thread();
    for (;;) {
      auto e = pop(into, size);
      // Once stopped, only errc::stopped: not the events the stop itself queued.
      if (stopped.load()) return make_error_code(errc::stopped);
      if (e || e.error() != make_error_code(uipc::errc::timed_out)) return e;
      if (sweep() > 0) continue;
      if (!wait) return make_error_code(uipc::errc::timed_out);
      if (!hot.empty()) {
        const auto budget = policy.spin_budget(options.max_spin);
        const auto start = budget.count() > 0 ? clock::now() : clock::time_point{};
        if (policy.spin_then_yield(options.max_spin, budget, start, deadline,
                                   [&] { return any_hot_ready(); })) {
          continue;
        }
      }
      if (!quiesce()) continue;
      int timeout_ms = -1;
      if (deadline != clock::time_point::max()) {
        const auto left = deadline - clock::now();
        if (left <= clock::duration::zero()) return make_error_code(uipc::errc::timed_out);
        timeout_ms = static_cast<int>(std::min<long long>(
            std::chrono::ceil<std::chrono::milliseconds>(left).count(), 1 << 30));
      }
      poll_bells(timeout_ms);
    }
  }

  // ---- async receivers ---------------------------------------------------------

  void serve_async() {
    for (;;) {
      {
        std::lock_guard lock(async_mutex);
        if (async_waiters.empty()) return;
        if (async_armed) {
          // The armed wait sleeps on doorbells, and clients ring only on
          // channels that were quiesced; a pump that delivered an event and
          // left (no receiver was waiting then) left its channels hot. Wake
          // the wait: its handler pumps, and quiesces before it sleeps again.
          boost::system::error_code ignored;
          epoll_desc.cancel(ignored);
          return;
        }
      }
      std::unique_lock pump(pump_mutex, std::try_to_lock);
      if (!pump.owns_lock()) {
        arm();
        return;
      }
      // The receiver is taken while the pump is held, before an event is
      // popped: two threads here at once (a posted start and the armed wait's
      // handler) must never pop two events for one receiver.
      std::optional<receive_handler> handler;
      {
        std::lock_guard lock(async_mutex);
        if (async_waiters.empty()) return;
        // Moved by construction: Boost 1.81's any_completion_handler move
        // assignment recurses without end.
        handler.emplace(std::move(async_waiters.front()));
        async_waiters.pop_front();
      }
      event ev;
      error_code ec;
      if (stopped.load()) {
        ec = make_error_code(errc::stopped);
      } else {
        auto e = pop(nullptr, nullptr);
        if (!e && sweep() > 0) e = pop(nullptr, nullptr);
        if (e) {
          ev = std::move(*e);
        } else {
          {
            std::lock_guard lock(async_mutex);  // no event for it: first in line again
            async_waiters.push_front(std::move(*handler));
          }
          if (!quiesce()) continue;
          pump.unlock();
          arm();
          return;
        }
      }
      pump.unlock();
      detail::post_completion(ctx, std::move(*handler), ec, std::move(ev));
    }
  }

  // Waits for the doorbells on the loop. The epoll descriptor is edge
  // triggered in the loop's reactor, so a bell that rang just before the wait
  // was queued is looked for after queueing it: then the wait is cancelled
  // and its handler reads again.
  void arm() {
    // Under async_mutex: serve_async() may cancel the wait from another thread.
    std::lock_guard lock(async_mutex);
    if (async_armed) return;
    async_armed = true;
    epoll_desc.async_wait(asio::posix::stream_descriptor::wait_read,
                          [self = shared_from_this()](error_code) {
                            {
                              std::lock_guard lock(self->async_mutex);
                              self->async_armed = false;
                            }
                            self->serve_async();
                          });
    epoll_event probe;
    if (::epoll_wait(epoll.get(), &probe, 1, 0) > 0 || !queue_empty() || stopped.load()) {
      boost::system::error_code ignored;
      epoll_desc.cancel(ignored);
    }
  }

  void fail_async(error_code ec) {
    std::deque<receive_handler> waiters;
    {
      std::lock_guard lock(async_mutex);
      waiters.swap(async_waiters);
    }
    for (auto& h : waiters) detail::post_completion(ctx, std::move(h), ec, event{});
  }

  // ---- answers -------------------------------------------------------------------

  // Takes request `id` of `ch` for answering, with a reply block of `size`.
  result<std::uint64_t> begin_reply(server_channel& ch, message_id id, std::size_t size) {
    for (int attempt = 0;; ++attempt) {
      std::unique_lock lock(ch.state_mutex);
      if (ch.closed) return make_error_code(errc::disconnected);
      auto m = ch.messages.find(id);
      if (m == ch.messages.end() || m->second.state == server_channel::message_state::replied ||
          m->second.state == server_channel::message_state::replying) {
        return make_error_code(errc::unknown_message);
      }
      if (m->second.state == server_channel::message_state::withdrawn) {
        lock.unlock();
        finish(ch, id, detail::entry_kind::aborted, 0, 0, 0);
        return make_error_code(errc::withdrawn);
      }
      if (size > ch.reply_space.size()) return make_error_code(errc::message_too_large);
      if (auto offset = ch.reply_space.allocate(size)) {
        m->second.state = server_channel::message_state::replying;
        m->second.reply_offset = *offset;
        m->second.has_block = true;
        return *offset;
      }
      if (attempt > 0) return make_error_code(errc::no_buffers);
      lock.unlock();
      // Disposals the client published free blocks: read them, then try again.
      std::vector<event> events;
      std::lock_guard read_lock(ch.read_mutex);
      if (!ch.read_closed && ch.drain(events) && !events.empty()) {
        std::lock_guard qlock(queue_mutex);
        for (auto& e : events) queue.push_back(std::move(e));
      }
    }
  }

  // Publishes the outcome of `id` to the client: a reply, aborted or failed.
  error_code finish(server_channel& ch, message_id id, detail::entry_kind kind,
                    std::uint32_t status, std::uint64_t offset, std::uint64_t length) {
    {
      std::lock_guard lock(ch.state_mutex);
      if (ch.closed) return make_error_code(errc::disconnected);
      auto m = ch.messages.find(id);
      if (m == ch.messages.end()) return make_error_code(errc::unknown_message);
      const auto free = ch.to_client.free_entries();
      if (!free || *free == 0) {
        if (m->second.has_block) ch.reply_space.free(m->second.reply_offset);
        m->second.has_block = false;
        if (m->second.state == server_channel::message_state::replying) {
          m->second.state = server_channel::message_state::delivered;
        }
        return make_error_code(free ? errc::no_buffers : errc::protocol_violation);
      }
      ch.to_client.put({static_cast<std::uint32_t>(kind), status, id, offset, length});
      ch.to_client.publish();
      --ch.awaiting;
      if (kind == detail::entry_kind::reply) {
        m->second.state = server_channel::message_state::replied;
      } else {
        ch.messages.erase(m);
      }
    }
    ch.wake_client();
    return {};
  }

  error_code answer(client_id client, message_id id, std::size_t size,
                    const std::function<void(std::span<std::byte>)>& fill) {
    if (epoch != detail::fork_epoch()) return make_error_code(errc::forked_copy);
    auto ch = find(client);
    if (!ch) return make_error_code(errc::disconnected);
    auto offset = begin_reply(*ch, id, size);
    if (!offset) return offset.error();
    fill(std::span(ch->reply_arena + *offset, size));
    auto ec = finish(*ch, id, detail::entry_kind::reply, 0, *offset, size);
    if (!ec) counters.replies.fetch_add(1, std::memory_order_relaxed);
    return ec;
  }

  void stop() {
    if (stopped.exchange(true)) return;
    if (srv) srv->stop();  // ends every session: session_ended for each
    const eventfd_t one = 1;
    (void)::write(control_bell.get(), &one, sizeof one);
    fail_async(make_error_code(errc::stopped));
    ::unlink(detail::info_path(socket_path).c_str());
    name_lock.reset();
  }
};

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
  asio::post(impl_->ctx, [self = impl_] { self->serve_async(); });
}

error_code service::reply(client_id client, message_id id, std::span<const std::byte> bytes) {
  return impl_->answer(client, id, bytes.size(), [bytes](std::span<std::byte> out) {
    if (!bytes.empty()) std::memcpy(out.data(), bytes.data(), bytes.size());
  });
}

error_code service::reply_in_place(client_id client, message_id id, std::size_t size,
                                   const std::function<void(std::span<std::byte>)>& fill) {
  return impl_->answer(client, id, size, fill);
}

error_code service::reject(client_id client, message_id id, errc ec) {
  auto ch = impl_->find(client);
  if (!ch) return make_error_code(errc::disconnected);
  using state = detail::server_channel::message_state;
  bool withdrawn = false;
  {
    std::lock_guard lock(ch->state_mutex);
    auto m = ch->messages.find(id);
    if (m == ch->messages.end() || m->second.state == state::replied ||
        m->second.state == state::replying) {
      return make_error_code(errc::unknown_message);
    }
    withdrawn = m->second.state == state::withdrawn;
  }
  if (withdrawn) {
    (void)impl_->finish(*ch, id, detail::entry_kind::aborted, 0, 0, 0);
    return make_error_code(errc::withdrawn);
  }
  return impl_->finish(*ch, id, detail::entry_kind::failed, static_cast<std::uint32_t>(ec), 0, 0);
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
