// The dispatcher: the seed's receive, restart, add, detach and event-return flows
// over one socket group, with recvmmsg/sendmmsg batching.
#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <boost/asio/append.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/ip/v6_only.hpp>
#include <boost/asio/post.hpp>
#include <cassert>
#include <cerrno>
#include <cstdlib>  // arc4random_buf (glibc 2.36)
#include <cstring>
#include <new>
#include <optional>
#include <stdexcept>

#include "engine.hpp"

namespace uipc::dispatch {

namespace asio = boost::asio;
using detail::engine;
using detail::party;

// ---------------------------------------------------------------- event, handles

event::event(event&& other) noexcept
    : party_(std::exchange(other.party_, nullptr)),
      buffer_(std::move(other.buffer_)),
      size_(std::exchange(other.size_, 0)),
      peer_(std::move(other.peer_)),
      reason_(std::move(other.reason_)),
      id_(other.id_),
      socket_(other.socket_),
      kind_(other.kind_) {}

event& event::operator=(event&& other) noexcept {
  if (this != &other) {
    release();
    party_ = std::exchange(other.party_, nullptr);
    buffer_ = std::move(other.buffer_);
    size_ = std::exchange(other.size_, 0);
    peer_ = other.peer_;
    reason_ = other.reason_;
    id_ = other.id_;
    socket_ = other.socket_;
    kind_ = other.kind_;
  }
  return *this;
}

void event::release() noexcept {
  if (party_ != nullptr) party_->engine_->return_event(*this);
}

response& response::operator=(response&& other) noexcept {
  if (this != &other) {
    detach();
    party_ = std::exchange(other.party_, nullptr);
  }
  return *this;
}

std::uint16_t response::id() const noexcept { return party_ ? party_->key_.id : 0; }

const udp::endpoint& response::peer() const noexcept {
  static const udp::endpoint none;
  return party_ ? party_->peer_ : none;
}

result<void> response::send(std::span<const std::byte> message) {
  if (!party_) return make_error_code(errc::detached);
  return party_->engine_->send_copy(party_, message);
}

void response::cancel() noexcept {
  if (party_) party_->engine_->cancel(party_);
}

void response::detach() noexcept {
  if (party_ == nullptr) return;
  party* p = std::exchange(party_, nullptr);
  p->engine_->detach(p);
}

listener& listener::operator=(listener&& other) noexcept {
  if (this != &other) {
    detach();
    party_ = std::exchange(other.party_, nullptr);
  }
  return *this;
}

result<void> listener::reply(event&& ev, std::span<const std::byte> answer) {
  if (!party_) {
    ev.release();
    return make_error_code(errc::detached);
  }
  return party_->engine_->reply(party_, std::move(ev), answer);
}

void listener::cancel() noexcept {
  if (party_) party_->engine_->cancel(party_);
}

void listener::detach() noexcept {
  if (party_ == nullptr) return;
  party* p = std::exchange(party_, nullptr);
  p->engine_->detach(p);
}

namespace detail {

// `ref` was taken when the operation was initiated; it keeps the party (and so
// the dispatcher) alive until here, even when the handle detached in between:
// the engine then refuses with errc::detached. Released on return.
void start_receive(party_ref ref, receive_handler handler) {
  party* const p = ref.get();
  if (p == nullptr) {
    // An empty handle has no loop to post to: the one completion that runs inline.
    std::move(handler)(make_error_code(errc::detached), event{});
    return;
  }
  p->engine_->start_receive(p, std::move(handler));
}

void start_send(party_ref ref, const udp::endpoint* to, std::span<const std::byte> message,
                send_handler handler) {
  party* const p = ref.get();
  if (p == nullptr) {
    std::move(handler)(make_error_code(errc::detached));
    return;
  }
  p->engine_->start_send(p, to ? *to : p->peer_, message, std::move(handler));
}

void add_ref(party* p) noexcept { p->refs_.fetch_add(1, std::memory_order_relaxed); }

void release(party* p) noexcept {
  if (p->refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
    // Dropping the party drops its reference on the dispatcher: when it was the
    // last one, the dispatcher (and its sockets) go now.
    delete p;  // NOLINT(cppcoreguidelines-owning-memory): parties are counted by hand (handles and
               // events)
  }
}

// ---------------------------------------------------------------- keys

peer_key peer_key::of(const udp::endpoint& ep) noexcept {
  peer_key k;
  k.port = ep.port();
  if (ep.address().is_v4()) {
    const auto b = ep.address().to_v4().to_bytes();
    std::copy(b.begin(), b.end(), k.address.begin());
  } else {
    k.v6 = true;
    const auto v6 = ep.address().to_v6();
    const auto b = v6.to_bytes();
    std::copy(b.begin(), b.end(), k.address.begin());
    k.scope = static_cast<std::uint32_t>(v6.scope_id());
  }
  return k;
}

namespace {
std::size_t mix(std::uint64_t a, std::uint64_t b) noexcept {
  std::uint64_t h = a * 0x9E3779B97F4A7C15ULL ^ (b + 0x632BE59BD9B4E019ULL + (a << 6) + (a >> 2));
  h ^= h >> 29;
  h *= 0xBF58476D1CE4E5B9ULL;
  h ^= h >> 32;
  return static_cast<std::size_t>(h);
}

std::uint64_t load64(const std::uint8_t* p) noexcept {
  std::uint64_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// The engine whose completions this thread runs now, and their batch.
thread_local engine* tl_delivering = nullptr;
thread_local std::vector<completion>* tl_batch = nullptr;
// The socket whose receive batch this thread runs.
thread_local socket_state* tl_batch_socket = nullptr;

error_code errno_code(int e) { return {e, boost::system::system_category()}; }

// Errors about one destination fail that send only; anything else is the socket's.
bool per_destination_error(int e) {
  switch (e) {
    case ENETUNREACH:
    case EHOSTUNREACH:
    case EAFNOSUPPORT:
    case EINVAL:
    case EACCES:
    case EPERM:
    case EMSGSIZE:
    case EDESTADDRREQ:
    case EADDRNOTAVAIL:
      return true;
    default:
      return false;
  }
}
}  // namespace

std::size_t peer_key_hash::operator()(const peer_key& k) const noexcept {
  return mix(load64(k.address.data()) ^ (std::uint64_t{k.port} << 1 | k.v6),
             load64(k.address.data() + 8) ^ (std::uint64_t{k.scope} << 32));
}

std::size_t id_key_hash::operator()(const id_key& k) const noexcept {
  return mix(load64(k.peer.address.data()) ^
                 (std::uint64_t{k.peer.port} << 17 | std::uint64_t{k.id} << 1 | k.peer.v6),
             load64(k.peer.address.data() + 8) ^ (std::uint64_t{k.peer.scope} << 32));
}

// ---------------------------------------------------------------- engine setup

engine::engine(asio::io_context& ctx, const dispatcher_options& options)
    : ctx_(ctx),
      options_(options),
      pool_(ctx.get_executor(), options.buffer_size, options.buffers),
      timer_(ctx) {}

engine::~engine() {
  // Every buffer is back by now: queues were emptied in close(), events keep the
  // dispatcher (and so this engine) alive, and receive handlers hold a reference.
  assert(pool_.in_use() == 0);
}

result<void> engine::open(const udp::endpoint& local) {
  const unsigned count = std::max(1u, options_.sockets);
  udp::endpoint bind_to = local;
  for (unsigned i = 0; i < count; ++i) {
    auto s = std::make_unique<socket_state>(ctx_);
    s->index = static_cast<std::uint8_t>(i);
    s->owner = this;
    error_code ec;
    s->socket.open(bind_to.protocol(), ec);
    if (ec) return ec;
    if (count > 1) {
      int one = 1;
      if (::setsockopt(s->socket.native_handle(), SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0)
        return errno_code(errno);
    }
    if (bind_to.address().is_v6()) {
      s->socket.set_option(asio::ip::v6_only(true), ec);
      if (ec) return ec;
    }
    if (options_.socket_buffer_bytes > 0) {
      s->socket.set_option(asio::socket_base::receive_buffer_size(options_.socket_buffer_bytes),
                           ec);
      s->socket.set_option(asio::socket_base::send_buffer_size(options_.socket_buffer_bytes), ec);
      ec.clear();  // a smaller buffer than asked for is not fatal
    }
    s->socket.bind(bind_to, ec);
    if (ec) return ec;
    s->socket.non_blocking(true, ec);
    if (ec) return ec;
    if (i == 0) {
      local_ = s->socket.local_endpoint(ec);
      if (ec) return ec;
      bind_to = local_;  // the others join the same port
    }
    s->fd = s->socket.native_handle();
    const std::size_t batch = options_.max_receives;
    s->buffers.resize(batch);
    s->headers.resize(batch);
    s->vectors.resize(batch);
    s->addresses.resize(batch);
    s->send_headers.resize(64);
    s->send_vectors.resize(64);
    sockets_.push_back(std::move(s));
  }
  idle_sockets_.store(count);
  return {};
}

void engine::close() noexcept {
  std::deque<queued_message> dropped;
  {
    std::lock_guard lock(mutex_);
    closed_ = true;
    shutting_down_ = true;
    stopping_.store(true, std::memory_order_relaxed);
    dropped.swap(queries_);
    lent_buffers_ = 0;
    timer_.cancel();
  }
  for (auto& s : sockets_) {
    std::deque<outgoing> unsent;
    {
      std::lock_guard io(s->io_mutex);
      s->closed = true;
      error_code ignored;
      s->socket.close(ignored);
      unsent.swap(s->send_queue);
    }
    for (auto& o : unsent) {
      if (o.handler) {
        asio::post(ctx_,
                   asio::append(std::move(o.handler), error_code(asio::error::operation_aborted)));
      }
    }
  }
}

udp::endpoint engine::local_endpoint() const { return local_; }

std::vector<int> engine::native_handles() const {
  std::vector<int> fds;
  for (const auto& s : sockets_) fds.push_back(s->fd);
  return fds;
}

dispatcher_stats engine::stats() const {
  dispatcher_stats st;
  st.received = received_.load(std::memory_order_relaxed);
  st.sent = sent_.load(std::memory_order_relaxed);
  st.dropped_short = dropped_short_.load(std::memory_order_relaxed);
  st.dropped_no_listener = dropped_no_listener_.load(std::memory_order_relaxed);
  st.dropped_unmatched = dropped_unmatched_.load(std::memory_order_relaxed);
  st.dropped_queue_full = dropped_queue_full_.load(std::memory_order_relaxed);
  st.no_buffer_events = no_buffer_events_.load(std::memory_order_relaxed);
  st.timeouts = timeouts_.load(std::memory_order_relaxed);
  st.send_errors = send_errors_.load(std::memory_order_relaxed);
  st.dropped_no_memory = dropped_no_memory_.load(std::memory_order_relaxed);
  st.buffers_in_use = pool_.in_use();
  std::lock_guard lock(mutex_);
  st.buffers_lent = lent_buffers_;
  st.queued_queries = queries_.size();
  st.responses = responses_.size();
  st.listeners = listeners_.size();
  for (const auto& s : sockets_) st.receiving_sockets += s->receiving ? 1 : 0;
  st.shutting_down = shutting_down_;
  return st;
}

// ---------------------------------------------------------------- attach

std::uint16_t engine::next_random_locked() {
  if (random_left_ == 0) {
    // A CSPRNG (getrandom-backed), drawn in bulk: IDs an observer cannot predict
    // from the ones it saw, at the cost of one system call per 1024 IDs.
    ::arc4random_buf(random_.data(), sizeof random_);
    random_left_ = random_.size();
  }
  return random_[--random_left_];
}

result<std::uint16_t> engine::allocate_id_locked(const peer_key& peer) {
  auto it = per_peer_.find(peer);
  const std::uint32_t live = it == per_peer_.end() ? 0 : it->second;
  if (live >= 65536) return make_error_code(errc::no_free_id);
  id_key key{peer, 0};
  // Random probes while at most 3/4 of the IDs are taken (expected < 4 probes);
  // beyond that, a scan from a random start ends for sure.
  if (live < 49152) {
    for (int tries = 0; tries < 64; ++tries) {
      key.id = next_random_locked();
      if (!responses_.contains(key)) return key.id;
    }
  }
  const std::uint16_t start = next_random_locked();
  for (std::uint32_t i = 0; i < 65536; ++i) {
    key.id = static_cast<std::uint16_t>(start + i);
    if (!responses_.contains(key)) return key.id;
  }
  return make_error_code(errc::no_free_id);
}

result<response> engine::add_response(dispatcher& owner, const udp::endpoint& peer,
                                      const response_options& options) {
  if (peer.address().is_v6() != local_.address().is_v6())
    return make_error_code(asio::error::address_family_not_supported);
  auto p = std::make_unique<party>(*this, ref_ptr<dispatcher>(&owner), party::role::response);
  p->peer_ = peer;
  std::vector<socket_state*> to_arm;
  to_arm.reserve(sockets_.size());  // restart_locked below then cannot throw
  completions out;
  out.reserve(1);
  {
    std::lock_guard lock(mutex_);
    if (shutting_down_) return make_error_code(errc::shutting_down);
    const peer_key pk = peer_key::of(peer);
    auto id = allocate_id_locked(pk);
    if (!id) return id.error();
    p->key_ = {pk, *id};
    p->serial_ = next_serial_++;
    // Both maps, or neither: a throw here must not leave either one naming a
    // party that the unique_ptr is about to free.
    std::uint32_t& live = per_peer_[pk];  // may throw: nothing else changed yet
    ++live;
    try {
      responses_.emplace(p->key_, p.get());
      try {
        if (options.timeout.count() > 0) link_timeout_locked(*p, options.timeout);
      } catch (...) {
        responses_.erase(p->key_);
        throw;
      }
    } catch (...) {
      if (--per_peer_[pk] == 0) per_peer_.erase(pk);
      throw;
    }
    restart_locked(to_arm, out);
  }
  for (auto* s : to_arm) arm(*s);
  post_completions(out);
  return response(p.release());
}

result<listener> engine::add_listener(dispatcher& owner) {
  auto p = std::make_unique<party>(*this, ref_ptr<dispatcher>(&owner), party::role::listener);
  std::vector<socket_state*> to_arm;
  to_arm.reserve(sockets_.size());
  completions out;
  out.reserve(1);  // restart_locked's one possible no_buffers event
  {
    std::lock_guard lock(mutex_);
    if (shutting_down_) return make_error_code(errc::shutting_down);
    listeners_.push_back(p.get());
    restart_locked(to_arm, out);
  }
  for (auto* s : to_arm) arm(*s);
  post_completions(out);
  return listener(p.release());
}

// ---------------------------------------------------------------- delivery

bool engine::deliverable_locked(const party& p) const noexcept {
  if (!p.attached_) return false;
  if (p.pending_) return true;
  if (p.role_ == party::role::response ? !p.queue_.empty() : !queries_.empty()) return true;
  return shutting_down_ && !p.shutdown_delivered_;
}

// Hands the party its next event, if it waits, holds none, and one is there.
// Order: queued messages (a response's timeout after its queued replies; a
// listener's no_buffers before the queries that hold the buffers), then shutdown.
void engine::collect_locked(party& p, completions& out) {
  if (!p.waiter_ || p.lent_ || !p.attached_) return;
  // The one allocation, before any state changes: on bad_alloc the event stays
  // where it is, for a later collect.
  if (out.size() == out.capacity()) out.reserve(out.size() * 2 + 1);
  event ev;
  error_code ec;
  auto take_message = [&](auto& q) {
    queued_message& m = q.front();
    ev.buffer_ = std::move(m.buffer);
    ev.size_ = m.size;
    ev.peer_ = m.peer;
    ev.id_ = m.id;
    ev.socket_ = m.socket;
    ev.kind_ = event_kind::message;
    if constexpr (requires { q.pop_front(); }) {
      q.pop_front();
    } else {
      q.erase(q.begin());
    }
    ++lent_buffers_;
  };
  if (p.role_ == party::role::listener && p.pending_) {
    ec = std::exchange(p.pending_, {});
    ev.kind_ = event_kind::no_buffers;
  } else if (p.role_ == party::role::listener && !queries_.empty()) {
    take_message(queries_);
  } else if (p.role_ == party::role::response && !p.queue_.empty()) {
    take_message(p.queue_);
  } else if (p.pending_) {
    ec = std::exchange(p.pending_, {});
    ev.kind_ = event_kind::timed_out;
    ev.peer_ = p.peer_;
    ev.id_ = p.key_.id;
  } else if (shutting_down_ && !p.shutdown_delivered_) {
    // The failsafe event: made from state the party already has (the event
    // needs no allocation, and the receive it completes was allocated when
    // the party asked for it).
    p.shutdown_delivered_ = true;
    ec = make_error_code(errc::shutting_down);
    ev.kind_ = event_kind::shutdown;
    ev.reason_ = reason_;
    ev.peer_ = p.peer_;
    ev.id_ = p.key_.id;
  } else {
    return;
  }
  if (p.idle_) {
    idle_listeners_.erase(std::find(idle_listeners_.begin(), idle_listeners_.end(), &p));
    p.idle_ = false;
  }
  p.lent_ = true;
  add_ref(&p);  // the event's reference
  ev.party_ = &p;
  out.push_back({std::move(p.waiter_), ec, std::move(ev)});
  p.waiter_ = nullptr;
}

// After the party's state changed (a new waiter, an event returned): deliver
// its next event, or wait idle for a query. When this thread already runs our
// completions (the party's handler asked for more from inside one), the event
// joins that batch: run right after, with no recursion, post or second lock.
void engine::make_ready_locked(party& p, completions& out) {
  if (!p.waiter_ || p.lent_ || !p.attached_) return;
  if (deliverable_locked(p)) {
    collect_locked(p, tl_delivering == this ? *tl_batch : out);
  } else if (p.role_ == party::role::listener && !p.idle_) {
    p.idle_ = true;
    idle_listeners_.push_back(&p);
  }
}

// Runs a completion now when its handler belongs on this thread (the common
// case: a plain handler, the loop's own executor, called from the loop);
// otherwise hands it to its executor.
void engine::invoke(completion& c) {
  const auto mine = ctx_.get_executor();
  auto ex = asio::get_associated_executor(c.handler, mine);
  const auto* target = ex.target<asio::io_context::executor_type>();
  if (target != nullptr && *target == mine && mine.running_in_this_thread()) {
    std::move(c.handler)(c.ec, std::move(c.ev));
  } else {
    asio::dispatch(ctx_, asio::append(std::move(c.handler), c.ec, std::move(c.ev)));
  }
}

void engine::run_completions(completions& batch) {
  std::size_t i = 0;
  // Restores the thread's state however the loop ends: a handler run inline
  // may throw (through io_context::run to the application); the completions
  // after it are then posted, not lost.
  struct scope {
    engine* self;
    completions& batch;
    std::size_t& next;
    engine* outer = std::exchange(tl_delivering, self);
    completions* outer_batch = std::exchange(tl_batch, &batch);
    ~scope() {
      tl_batch = outer_batch;
      tl_delivering = outer;
      if (next < batch.size()) {
        batch.erase(batch.begin(), batch.begin() + static_cast<std::ptrdiff_t>(next));
        try {
          self->post_completions(batch);
        } catch (...) {  // NOLINT(bugprone-empty-catch): nothing better while unwinding
        }
      }
      batch.clear();
    }
  } guard{this, batch, i};
  // Handlers may append to `batch` (see make_ready_locked): index, and move
  // each completion out before running it.
  while (i < batch.size()) {
    completion c(std::move(batch[i++]));
    invoke(c);
  }
}

void engine::post_completions(completions& batch) {
  for (auto& c : batch) {
    asio::post(ctx_, asio::append(std::move(c.handler), c.ec, std::move(c.ev)));
  }
  batch.clear();
}

void engine::start_receive(party* p, receive_handler handler) {
  completions out;
  error_code refuse;
  {
    std::lock_guard lock(mutex_);
    if (!p->attached_) {
      refuse = make_error_code(errc::detached);
    } else if (p->waiter_) {
      refuse = asio::error::already_started;
    } else if (p->shutdown_delivered_ && !deliverable_locked(*p)) {
      refuse = make_error_code(errc::shutting_down);
    } else {
      // Not operator=: Boost 1.81's move assignment wraps the handler in itself.
      p->waiter_.swap(handler);
      // An initiating function never completes inline: the event joins the
      // batch this thread is running (after the current handler), or is posted.
      if (!p->lent_ && deliverable_locked(*p)) {
        collect_locked(*p, tl_delivering == this ? *tl_batch : out);
      } else if (!p->lent_ && p->role_ == party::role::listener && !p->idle_) {
        p->idle_ = true;
        idle_listeners_.push_back(p);
      }
    }
  }
  if (refuse) {
    asio::post(ctx_, asio::append(std::move(handler), refuse, event{}));
    return;
  }
  post_completions(out);
}

void engine::return_event(event& ev) noexcept {
  party* p = std::exchange(ev.party_, nullptr);
  const bool had_buffer = static_cast<bool>(ev.buffer_);
  ev.buffer_.reset();
  ev.size_ = 0;
  completions out;
  std::vector<socket_state*> to_arm;
  {
    std::lock_guard lock(mutex_);
    if (had_buffer && !closed_) --lent_buffers_;
    p->lent_ = false;
    make_ready_locked(*p, out);
    if (had_buffer) restart_locked(to_arm, out);
  }
  for (auto* s : to_arm) arm(*s);
  if (!out.empty()) post_completions(out);
  release(p);
}

void engine::cancel(party* p) noexcept {
  receive_handler aborted;
  {
    std::lock_guard lock(mutex_);
    aborted.swap(p->waiter_);
    if (p->idle_) {
      idle_listeners_.erase(std::find(idle_listeners_.begin(), idle_listeners_.end(), p));
      p->idle_ = false;
    }
    unlink_timeout_locked(*p);
  }
  if (aborted) {
    asio::post(ctx_, asio::append(std::move(aborted), error_code(asio::error::operation_aborted),
                                  event{}));
  }
}

void engine::detach(party* p) noexcept {
  receive_handler aborted;
  std::vector<queued_message> dropped;
  std::deque<queued_message> dropped_queries;
  {
    std::lock_guard lock(mutex_);
    p->attached_ = false;
    aborted.swap(p->waiter_);
    dropped.swap(p->queue_);
    if (p->idle_) {
      idle_listeners_.erase(std::find(idle_listeners_.begin(), idle_listeners_.end(), p));
      p->idle_ = false;
    }
    if (p->role_ == party::role::response) {
      unlink_timeout_locked(*p);
      responses_.erase(p->key_);
      auto it = per_peer_.find(p->key_.peer);
      if (it != per_peer_.end() && --it->second == 0) per_peer_.erase(it);
    } else {
      listeners_.erase(std::find(listeners_.begin(), listeners_.end(), p));
      // With no listener left, waiting queries have no one to go to.
      if (listeners_.empty()) dropped_queries.swap(queries_);
    }
  }
  // The dropped replies and queries give their buffers back first: the
  // restart below may then find the pool no longer dry.
  dropped.clear();
  dropped_queries.clear();
  // Decided under the mutex (not from the idle_sockets_ hint): a receive that
  // stopped on the dry pool since is restarted now.
  restart(false);
  if (aborted) {
    asio::post(ctx_, asio::append(std::move(aborted), error_code(asio::error::operation_aborted),
                                  event{}));
  }
  release(p);  // the handle's reference: may destroy the dispatcher
}

void engine::link_timeout_locked(party& p, std::chrono::steady_clock::duration timeout) {
  timeout_list* list = nullptr;
  for (auto& l : timeout_lists_) {
    if (l->duration == timeout) list = l.get();
  }
  if (list == nullptr) {
    timeout_lists_.push_back(std::make_unique<timeout_list>());
    list = timeout_lists_.back().get();
    list->duration = timeout;
  }
  p.deadline_ = std::chrono::steady_clock::now() + timeout;
  p.timeouts_ = list;
  p.earlier_ = list->tail;
  p.later_ = nullptr;
  (list->tail ? list->tail->later_ : list->head) = &p;
  list->tail = &p;
  if (p.deadline_ < armed_for_) arm_timer_locked();
}

void engine::unlink_timeout_locked(party& p) noexcept {
  timeout_list* list = std::exchange(p.timeouts_, nullptr);
  if (list == nullptr) return;
  (p.earlier_ ? p.earlier_->later_ : list->head) = p.later_;
  (p.later_ ? p.later_->earlier_ : list->tail) = p.earlier_;
  p.earlier_ = p.later_ = nullptr;
  // The timer stays armed for a deadline that may be gone: it then fires
  // early, finds nothing due and re-arms. Cheaper than re-arming on every detach.
}

void engine::arm_timer_locked() {
  auto earliest = std::chrono::steady_clock::time_point::max();
  for (auto& l : timeout_lists_) {
    if (l->head && l->head->deadline_ < earliest) earliest = l->head->deadline_;
  }
  armed_for_ = earliest;
  // After shutdown, timeouts no longer matter (every party gets its shutdown
  // event): the timer must not keep the loop busy until an old deadline.
  if (earliest == std::chrono::steady_clock::time_point::max() || closed_ || shutting_down_) return;
  timer_.expires_at(earliest);  // aborts the wait for an older deadline
  timer_.async_wait([self = shared_from_this()](error_code ec) {
    if (!ec) self->on_timer();
  });
}

void engine::on_timer() {
  completions out;
  {
    std::lock_guard lock(mutex_);
    // A wait that completed before shutdown() cancelled the timer still runs:
    // nothing may follow the shutdown event, and nothing is re-armed.
    if (shutting_down_) return;
    const auto now = std::chrono::steady_clock::now();
    // Due responses in deadline order across the lists (a late timer may find
    // several lists due at once).
    for (;;) {
      timeout_list* first = nullptr;
      for (auto& l : timeout_lists_) {
        if (l->head && l->head->deadline_ <= now &&
            (!first || l->head->deadline_ < first->head->deadline_))
          first = l.get();
      }
      if (first == nullptr) break;
      party& p = *first->head;
      unlink_timeout_locked(p);
      p.pending_ = make_error_code(errc::timed_out);
      timeouts_.fetch_add(1, std::memory_order_relaxed);
      collect_locked(p, out);
    }
    arm_timer_locked();
  }
  run_completions(out);
}

// ---------------------------------------------------------------- receive

// The seed's restart flow, for every socket with no receive running.
void engine::restart_locked(std::vector<socket_state*>& to_arm, completions& out) {
  if (idle_sockets_.load(std::memory_order_relaxed) == 0) return;
  for (auto& s : sockets_) {
    if (s->receiving) continue;
    if (closed_ || shutting_down_) return;
    if (responses_.empty() && listeners_.empty()) return;  // no one attached
    if (pool_.available() == 0) {
      if (lent_buffers_ > 0) return;  // wait for a lent buffer to come back
      // Another socket's batch holds buffers it has not classified yet: they
      // come back (or get queued) at that batch's end, which restarts us.
      if (in_batch_.load(std::memory_order_seq_cst) > 0) return;
      if (!responses_.empty()) return;  // replies queued for responses hold them: wait
      // Only listeners, and queued queries hold every buffer: tell one of them.
      party* p = listeners_[error_event_turn_++ % listeners_.size()];
      if (!p->pending_) {
        p->pending_ = make_error_code(errc::no_buffers);
        no_buffer_events_.fetch_add(1, std::memory_order_relaxed);
        collect_locked(*p, out);
      }
      return;
    }
    s->receiving = true;
    idle_sockets_.fetch_sub(1, std::memory_order_relaxed);
    to_arm.push_back(s.get());
  }
}

// `from_loop`: called from one of our completions, where a handler may run at
// once; otherwise (from an application call) completions are posted.
void engine::restart(bool from_loop) {
  std::vector<socket_state*> to_arm;
  completions out;
  {
    std::lock_guard lock(mutex_);
    restart_locked(to_arm, out);
  }
  for (auto* s : to_arm) arm(*s);
  if (out.empty()) return;
  if (from_loop) {
    run_completions(out);
  } else {
    post_completions(out);
  }
}

void engine::restart_if_needed(bool from_loop) {
  // The hint only skips the lock on the hot path; a stale "no idle socket"
  // is harmless there (the socket that stopped restarts itself at its end).
  if (idle_sockets_.load(std::memory_order_acquire) != 0) restart(from_loop);
}

// Waits for readability, then on_readable reads with recvmmsg until EAGAIN.
// Race-free with several loop threads: asio registers a non-speculative wait
// with EPOLL_CTL_MOD, which makes the kernel re-check readiness, so a datagram
// whose edge another thread's epoll_wait took since our last read is reported.
void engine::arm(socket_state& s) {
  std::lock_guard io(s.io_mutex);
  // stopping_ is set (under mutex_) before fail() cancels the sockets under
  // io_mutex: checked here under io_mutex, a re-arm either is cancelled by
  // fail() or sees stopping_ and does not arm.
  if (s.closed || stopping_.load(std::memory_order_relaxed)) {
    std::lock_guard lock(mutex_);
    s.receiving = false;
    idle_sockets_.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  s.socket.async_wait(asio::socket_base::wait_read,
                      [self = shared_from_this(), &s](error_code ec) { self->on_readable(s, ec); });
}

void engine::on_readable(socket_state& s, error_code ec) {
  auto stop_receiving = [&] {
    std::lock_guard lock(mutex_);
    s.receiving = false;
    idle_sockets_.fetch_add(1, std::memory_order_relaxed);
  };
  if (ec == asio::error::operation_aborted) {
    stop_receiving();
    return;
  }
  if (ec) {
    stop_receiving();
    fail(ec, true);
    return;
  }
  if (stopping_.load(std::memory_order_relaxed)) {
    stop_receiving();
    return;
  }
  // Restores the thread's batch socket, and on a throw (a handler run inline)
  // stops this receive and restarts, so the socket is not left "receiving".
  struct scope {
    scope(engine* e, socket_state& state) noexcept
        : self(e), s(state), outer(std::exchange(tl_batch_socket, &state)) {}
    scope(const scope&) = delete;
    scope& operator=(const scope&) = delete;
    engine* self;
    socket_state& s;
    socket_state* outer;
    int exceptions = std::uncaught_exceptions();
    ~scope() {
      tl_batch_socket = outer;
      if (std::uncaught_exceptions() > exceptions) {
        try {
          {
            std::lock_guard lock(self->mutex_);
            s.receiving = false;
            self->idle_sockets_.fetch_add(1, std::memory_order_release);
          }
          self->restart(false);
        } catch (...) {  // NOLINT(bugprone-empty-catch): nothing better while unwinding
        }
      }
    }
  };
  std::optional<scope> guard;
  guard.emplace(this, s);
  const std::size_t batch = options_.max_receives;
  bool drained = false;
  // Read until EAGAIN; after a bounded number of batches, yield to the loop
  // (the re-armed receive completes at once while data remains).
  for (int round = 0; round < 16 && !drained && !stopping_.load(std::memory_order_relaxed);
       ++round) {
    std::size_t n = 0;
    // Counted before they are taken: another socket that finds the pool dry
    // meanwhile knows they are coming back (restart_locked).
    in_batch_.fetch_add(batch, std::memory_order_seq_cst);
    for (; n < batch; ++n) {
      s.buffers[n] = pool_.try_acquire();
      if (!s.buffers[n]) break;
      s.vectors[n] = {s.buffers[n].data(), s.buffers[n].size()};
      auto& h = s.headers[n].msg_hdr;
      h = {};
      h.msg_name = &s.addresses[n];
      h.msg_namelen = sizeof(sockaddr_storage);
      h.msg_iov = &s.vectors[n];
      h.msg_iovlen = 1;
      s.headers[n].msg_len = 0;
    }
    in_batch_.fetch_sub(batch - n, std::memory_order_seq_cst);
    if (n == 0) break;  // the pool ran dry: restart_locked decides below
    int got;
    int err = 0;
    {
      std::lock_guard io(s.io_mutex);
      if (s.closed) {
        got = -1;
        err = ECANCELED;
      } else {
        got = ::recvmmsg(s.fd, s.headers.data(), static_cast<unsigned>(n), MSG_DONTWAIT, nullptr);
        if (got < 0) err = errno;
      }
    }
    if (got < 0) {
      for (std::size_t i = 0; i < n; ++i) s.buffers[i].reset();
      in_batch_.fetch_sub(n, std::memory_order_seq_cst);
      if (err == EAGAIN || err == EWOULDBLOCK) {
        drained = true;
        break;
      }
      if (err == EINTR) continue;
      guard.reset();
      stop_receiving();
      if (err != ECANCELED) fail(errno_code(err), true);
      return;
    }
    received_.fetch_add(static_cast<std::uint64_t>(got), std::memory_order_relaxed);
    completions& out = s.delivered;  // reused: no allocation per batch
    for (std::size_t i = static_cast<std::size_t>(got); i < n; ++i) s.buffers[i].reset();
    {
      std::lock_guard lock(mutex_);
      classify_locked(s, got, out);
      in_batch_.fetch_sub(n, std::memory_order_seq_cst);
    }
    run_completions(out);
    flush(s);
    if (static_cast<std::size_t>(got) < n) drained = true;
  }
  guard.reset();
  stop_receiving();
  restart(true);
}

// The seed's receive flow for one batch: short datagrams dropped, queries to
// an idle listener or the shared queue, replies to their response or dropped.
void engine::classify_locked(socket_state& s, int count, completions& out) {
  const framing& f = options_.frame;
  for (int i = 0; i < count; ++i) {
    pooled_buffer& buffer = s.buffers[static_cast<std::size_t>(i)];
    const std::size_t size = s.headers[static_cast<std::size_t>(i)].msg_len;
    const std::span<const std::byte> data(buffer.data(), size);
    if (size < f.header_size ||
        (s.headers[static_cast<std::size_t>(i)].msg_hdr.msg_flags & MSG_TRUNC) != 0) {
      dropped_short_.fetch_add(1, std::memory_order_relaxed);
      buffer.reset();
      continue;
    }
    if (shutting_down_) {  // nothing is delivered after the shutdown event
      buffer.reset();
      continue;
    }
    udp::endpoint from;
    const auto* sa = reinterpret_cast<const sockaddr*>(&s.addresses[static_cast<std::size_t>(i)]);
    std::memcpy(from.data(), sa,
                sa->sa_family == AF_INET6 ? sizeof(sockaddr_in6) : sizeof(sockaddr_in));
    const std::uint16_t id = f.read_id(data);
    queued_message m{std::move(buffer), size, from, id, s.index};
    // The seed's "cannot allocate": free the buffer, count, go on (the receive
    // restarts at the batch's end). Never leaves the socket stuck "receiving".
    try {
      classify_one_locked(m, data, out);
    } catch (const std::bad_alloc&) {
      if (m.buffer) {
        m.buffer.reset();
        dropped_no_memory_.fetch_add(1, std::memory_order_relaxed);
      }
    }
  }
}

void engine::classify_one_locked(queued_message& m, std::span<const std::byte> data,
                                 completions& out) {
  const framing& f = options_.frame;
  {
    const udp::endpoint& from = m.peer;
    const std::uint16_t id = m.id;
    if (!f.is_response(data)) {
      if (listeners_.empty()) {
        dropped_no_listener_.fetch_add(1, std::memory_order_relaxed);
        return;
      }
      // A listener waiting idle takes the query even with a zero-length queue
      // (an idle listener exists only while the queue is empty).
      if (queries_.size() >= options_.max_queued_queries && idle_listeners_.empty()) {
        dropped_queue_full_.fetch_add(1, std::memory_order_relaxed);
        return;
      }
      queries_.push_back(std::move(m));
      // Earlier queries first: an idle listener exists only while the queue is empty.
      if (!idle_listeners_.empty()) collect_locked(*idle_listeners_.front(), out);
      return;
    }
    auto it = responses_.find(id_key{peer_key::of(from), id});
    if (it == responses_.end()) {
      dropped_unmatched_.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    party& p = *it->second;
    if (p.queue_.size() >= options_.max_queued_per_response) {
      dropped_queue_full_.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    p.queue_.push_back(std::move(m));
    collect_locked(p, out);
  }
}

// ---------------------------------------------------------------- failsafe shutdown

void engine::fail_locked(error_code reason, completions& out) {
  if (shutting_down_) return;
  shutting_down_ = true;
  stopping_.store(true, std::memory_order_relaxed);
  reason_ = reason;
  for (auto& [key, p] : responses_) collect_locked(*p, out);
  for (party* p : listeners_) collect_locked(*p, out);
}

void engine::fail(error_code reason, bool from_loop) {
  completions out;
  {
    std::lock_guard lock(mutex_);
    fail_locked(reason, out);
    timer_.cancel();  // timeouts no longer matter: every party gets its shutdown event
  }
  // Nothing more is read: cancel the armed receives, so that a loop with no
  // other work can finish.
  for (auto& s : sockets_) {
    std::lock_guard io(s->io_mutex);
    error_code ignored;
    s->socket.cancel(ignored);
  }
  // Sends that had not gone out will not.
  for (auto& s : sockets_) {
    std::deque<outgoing> unsent;
    {
      std::lock_guard io(s->io_mutex);
      unsent.swap(s->send_queue);
    }
    std::uint32_t returned = 0;
    for (auto& o : unsent) {
      if (o.buffer) ++returned;
      o.buffer.reset();
      if (o.handler) {
        asio::post(ctx_, asio::append(std::move(o.handler), make_error_code(errc::shutting_down)));
      }
    }
    if (returned != 0) {
      std::lock_guard lock(mutex_);
      if (!closed_) lent_buffers_ -= returned;
    }
  }
  if (from_loop) {
    run_completions(out);
  } else {
    post_completions(out);  // from an application call: never a handler inside it
  }
}

// ---------------------------------------------------------------- send

void engine::start_send(party* p, const udp::endpoint& to, std::span<const std::byte> message,
                        send_handler handler) {
  error_code refuse;
  {
    std::lock_guard lock(mutex_);
    if (!p->attached_)
      refuse = make_error_code(errc::detached);
    else if (shutting_down_)
      refuse = make_error_code(errc::shutting_down);
  }
  if (!refuse && to.address().is_v6() != local_.address().is_v6())
    refuse = asio::error::address_family_not_supported;
  if (refuse) {
    asio::post(ctx_, asio::append(std::move(handler), refuse));
    return;
  }
  enqueue(send_socket(), outgoing{to, message.data(), message.size(), {}, std::move(handler)});
}

result<void> engine::send_copy(party* p, std::span<const std::byte> message) {
  if (message.size() > pool_.buffer_size()) return make_error_code(errc::message_too_large);
  auto buffer = pool_.acquire();
  if (!buffer) return buffer.error();
  {
    std::lock_guard lock(mutex_);
    if (!p->attached_) return make_error_code(errc::detached);
    if (shutting_down_) return make_error_code(errc::shutting_down);
    ++lent_buffers_;
  }
  std::memcpy(buffer->data(), message.data(), message.size());
  const std::byte* data = buffer->data();
  if (!enqueue(send_socket(), outgoing{p->peer_, data, message.size(), std::move(*buffer), {}}))
    return make_error_code(errc::shutting_down);
  return {};
}

result<void> engine::reply(party* p, event&& ev, std::span<const std::byte> answer) {
  event held = std::move(ev);
  if (!held || held.kind_ != event_kind::message || held.party_->engine_ != this)
    return make_error_code(errc::detached);
  if (answer.size() > held.buffer_.size()) return make_error_code(errc::message_too_large);
  if (answer.data() != held.buffer_.data())
    std::memmove(held.buffer_.data(), answer.data(), answer.size());
  // The buffer moves on to the send queue (still counted as lent); the event
  // itself is returned now, which lets the next query through.
  socket_state& s = *sockets_[held.socket_ < sockets_.size() ? held.socket_ : 0];
  party* owner = std::exchange(held.party_, nullptr);
  completions ready;
  error_code refused;
  {
    std::lock_guard lock(mutex_);
    if (!p->attached_)
      refused = make_error_code(errc::detached);
    else if (shutting_down_)
      refused = make_error_code(errc::shutting_down);
    if (refused) --lent_buffers_;  // the buffer goes back below, not to the send queue
    owner->lent_ = false;
    make_ready_locked(*owner, ready);
  }
  if (refused) {
    held.buffer_.reset();
    restart_if_needed(false);
  } else if (!enqueue(s, outgoing{held.peer_,
                                  held.buffer_.data(),
                                  answer.size(),
                                  std::move(held.buffer_),
                                  {}})) {
    refused = make_error_code(errc::shutting_down);
  }
  if (!ready.empty()) post_completions(ready);
  release(owner);
  if (refused) return refused;
  return {};
}

// Inside one of our receive batches, the batch's socket: the send joins the
// sendmmsg at the batch's end. Otherwise the first socket.
socket_state& engine::send_socket() noexcept {
  return tl_batch_socket != nullptr && tl_batch_socket->owner == this ? *tl_batch_socket
                                                                      : *sockets_[0];
}

bool engine::enqueue(socket_state& s, outgoing&& out) {
  bool post_flush = false;
  {
    std::lock_guard io(s.io_mutex);
    if (s.closed) {
      // Dropped with the socket; the completion still runs.
      if (out.handler) {
        asio::post(
            ctx_, asio::append(std::move(out.handler), error_code(asio::error::operation_aborted)));
      }
      return false;
    }
    // fail() sets stopping_ before it empties the queue under io_mutex: a send
    // checked before the shutdown but queued after that would otherwise go out.
    if (stopping_.load(std::memory_order_relaxed)) {
      if (out.handler) {
        asio::post(ctx_,
                   asio::append(std::move(out.handler), make_error_code(errc::shutting_down)));
      }
      const bool had_buffer = static_cast<bool>(out.buffer);
      out.buffer.reset();
      if (had_buffer) {
        std::lock_guard io_unlocked_below(mutex_);  // io_mutex, then mutex_: as in arm()
        if (!closed_) --lent_buffers_;
      }
      return false;
    }
    s.send_queue.push_back(std::move(out));
    // Inside this socket's receive batch the batch end flushes; otherwise one
    // posted flush serves every send queued before it runs.
    if (tl_batch_socket != &s && !s.flush_posted && !s.write_wait) {
      s.flush_posted = true;
      post_flush = true;
    }
  }
  if (post_flush) {
    asio::post(ctx_, [self = shared_from_this(), &s] {
      {
        std::lock_guard io(s.io_mutex);
        s.flush_posted = false;
      }
      self->flush(s);
    });
  }
  return true;
}

void engine::flush(socket_state& s) {
  struct done_send {
    send_handler handler;
    error_code ec;
  };
  std::vector<done_send> done;
  std::uint32_t returned = 0;
  error_code socket_error;
  {
    std::lock_guard io(s.io_mutex);
    while (!s.send_queue.empty() && !s.closed && !s.write_wait) {
      const std::size_t n = std::min(s.send_queue.size(), s.send_headers.size());
      for (std::size_t i = 0; i < n; ++i) {
        outgoing& o = s.send_queue[i];
        s.send_vectors[i] = {const_cast<std::byte*>(o.data),
                             o.size};  // NOLINT: iovec is not const-correct
        auto& h = s.send_headers[i].msg_hdr;
        h = {};
        h.msg_name = o.to.data();
        h.msg_namelen = static_cast<socklen_t>(o.to.size());
        h.msg_iov = &s.send_vectors[i];
        h.msg_iovlen = 1;
      }
      const int sent =
          ::sendmmsg(s.fd, s.send_headers.data(), static_cast<unsigned>(n), MSG_DONTWAIT);
      if (sent < 0) {
        const int err = errno;
        if (err == EINTR) continue;
        if (err == EAGAIN || err == EWOULDBLOCK || err == ENOBUFS) {
          s.write_wait = true;
          s.socket.async_wait(asio::socket_base::wait_write,
                              [self = shared_from_this(), &s](error_code ec) {
                                {
                                  std::lock_guard io(s.io_mutex);
                                  s.write_wait = false;
                                }
                                if (!ec) self->flush(s);
                              });
          break;
        }
        outgoing& o = s.send_queue.front();
        send_errors_.fetch_add(1, std::memory_order_relaxed);
        if (o.handler) done.push_back({std::move(o.handler), errno_code(err)});
        if (o.buffer) ++returned;
        s.send_queue.pop_front();
        if (!per_destination_error(err)) {
          socket_error = errno_code(err);
          break;
        }
        continue;
      }
      sent_.fetch_add(static_cast<std::uint64_t>(sent), std::memory_order_relaxed);
      for (int i = 0; i < sent; ++i) {
        outgoing& o = s.send_queue.front();
        if (o.handler) done.push_back({std::move(o.handler), {}});
        if (o.buffer) ++returned;
        s.send_queue.pop_front();  // gives the buffer back to the pool (lock-free)
      }
    }
  }
  if (returned != 0) {
    {
      std::lock_guard lock(mutex_);
      if (!closed_) lent_buffers_ -= returned;
    }
    restart_if_needed(true);
  }
  for (auto& d : done) {
    asio::post(ctx_, asio::append(std::move(d.handler), d.ec));
  }
  if (socket_error) fail(socket_error, true);
}

}  // namespace detail

// ---------------------------------------------------------------- dispatcher

dispatcher::dispatcher(std::shared_ptr<detail::engine> engine) noexcept
    : engine_(std::move(engine)) {}

dispatcher::~dispatcher() { engine_->close(); }

result<ref_ptr<dispatcher>> dispatcher::create(asio::io_context& context,
                                               const udp::endpoint& local,
                                               const dispatcher_options& options) {
  if (!options.frame.valid() || options.buffer_size < options.frame.header_size ||
      options.buffers == 0 || options.max_receives == 0 || options.max_receives > 1024 ||
      options.sockets > 64 || options.max_queued_per_response == 0)
    return make_error_code(errc::bad_options);
  // The pool is allocated up front: a size that overflows, or that cannot be
  // allocated, is a bad option, not an exception out of create().
  constexpr std::size_t max_pool_bytes = std::size_t{1} << 40;
  if (options.buffer_size > max_pool_bytes / options.buffers)
    return make_error_code(errc::bad_options);
  try {
    auto e = std::make_shared<detail::engine>(context, options);
    if (auto opened = e->open(local); !opened) return opened.error();
    return ref_ptr<dispatcher>(new dispatcher(
        std::move(e)));  // NOLINT(cppcoreguidelines-owning-memory): adopted by the ref
  } catch (const std::bad_alloc&) {
    return make_error_code(errc::bad_options);
  } catch (const std::length_error&) {
    return make_error_code(errc::bad_options);
  }
}

result<response> dispatcher::add_response(const udp::endpoint& peer,
                                          const response_options& options) {
  return engine_->add_response(*this, peer, options);
}

result<listener> dispatcher::add_listener() { return engine_->add_listener(*this); }

udp::endpoint dispatcher::local_endpoint() const { return engine_->local_endpoint(); }

std::vector<int> dispatcher::native_handles() const { return engine_->native_handles(); }

const framing& dispatcher::frame() const noexcept { return engine_->frame(); }

dispatcher_stats dispatcher::stats() const { return engine_->stats(); }

void dispatcher::shutdown() { engine_->fail(asio::error::operation_aborted, /*from_loop=*/false); }

}  // namespace uipc::dispatch
