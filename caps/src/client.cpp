// Calls: send, wait, abort and dispose on the client's channel.
#include <unistd.h>

#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/post.hpp>
#include <climits>
#include <cstring>
#include <new>

#include "bell.hpp"
#include "client_core.hpp"
#include "completion.hpp"
#include "uipc/core/futex.hpp"
#include "uipc/core/process.hpp"
#include "uipc/core/wait_policy.hpp"

namespace uipc::caps {

namespace asio = boost::asio;

namespace detail {

client_core::client_core(asio::io_context& c, client_options o, blocking_connection control,
                         shm_segment seg, channel_layout l, unique_fd b)
    : ctx(c),
      options(o),
      ctrl(std::move(control)),
      server(ctrl.peer()),
      server_pidfd(open_pidfd(server.pid)),
      segment(std::move(seg)),
      layout(l),
      shared(static_cast<channel_shared*>(segment.data())),
      request_arena(static_cast<std::byte*>(segment.data()) + l.request_arena_offset),
      reply_arena(static_cast<const std::byte*>(segment.data()) + l.reply_arena_offset),
      bell(std::move(b)),
      to_server(&shared->to_server),
      from_server(&shared->to_client),
      request_space(l.request_arena_size, payload_alignment),
      bell_desc(c),
      pidfd_desc(c),
      registration(c, *this) {}

void client_core::drop_handlers() noexcept {
  // Destroyed after the lock (declared before it): a handler may own the client.
  std::vector<client::call_handler> handlers;
  std::vector<std::function<void()>> collected;
  std::lock_guard lock(mutex);
  collected.swap(completions);
  try {
    handlers.reserve(calls.size());
    for (auto& entry : calls) {
      if (entry.second.handler) handlers.emplace_back(std::move(entry.second.handler));
    }
  } catch (const std::bad_alloc&) {  // NOLINT(bugprone-empty-catch)
    // The reserve failed: the calls keep their handlers (a leak at worst).
  }
}

error_code client_core::usable() const {
  if (fork.forked_copy()) return make_error_code(errc::forked_copy);
  return closed;
}

bool client_core::maybe_ready() const noexcept {
  return from_server.maybe_ready() || shared->server_closed.load(std::memory_order_relaxed) != 0;
}

bool client_core::push(const entry& e) {
  const auto free = to_server.free_entries();
  if (!free) return false;
  if (*free == 0) {
    backlog.push_back(e);
    return true;
  }
  to_server.put(e);
  return true;
}

void client_core::flush_backlog() {
  while (!backlog.empty()) {
    const auto free = to_server.free_entries();
    if (!free || *free == 0) return;
    to_server.put(backlog.front());
    backlog.pop_front();
  }
}

void client_core::ring_server() {
  // Pairs with the server's store of server_watching and its re-check of our ring.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  if (shared->server_watching.load(std::memory_order_seq_cst) == 0) ring_bell(bell.get());
}

reply client_core::make_reply(std::uint64_t id, const call& c) {
  reply r;
  r.core_ = shared_from_this();
  r.id_ = id;
  r.data_ = reply_arena + c.reply_offset;
  r.length_ = static_cast<std::size_t>(c.reply_length);
  return r;
}

void client_core::finish_async(std::uint64_t id, call& c) {
  if (!c.handler || c.delivered) return;
  c.delivered = true;
  --async_waiting;
  auto handler = std::move(c.handler);
  completions_waiting.store(true, std::memory_order_relaxed);  // the mutex orders it
  if (c.error || !c.has_reply) {
    const auto ec = c.error ? c.error : make_error_code(errc::protocol_violation);
    completions.emplace_back([this, h = std::make_shared<client::call_handler>(std::move(handler)),
                              ec] { post_completion(ctx, std::move(*h), ec, reply{}); });
  } else {
    completions.emplace_back([this, h = std::make_shared<client::call_handler>(std::move(handler)),
                              r = std::make_shared<reply>(make_reply(id, c))] {
      post_completion(ctx, std::move(*h), error_code{}, std::move(*r));
    });
  }
}

void client_core::fail_all(error_code ec) {
  if (closed) return;
  closed = ec;
  for (auto& [id, c] : calls) {
    if (!c.delivered && !c.error && !c.has_reply) c.error = ec;
    finish_async(id, c);
  }
  in_flight = 0;
}

// Reads the server's ring. Everything in it is checked before use: the server
// can write this memory too.
void client_core::drain(std::unique_lock<std::mutex>&) {
  if (closed) return;
  // At most a ring's worth: a server that keeps writing does not keep us here.
  for (std::uint32_t i = 0; i < ring_entries; ++i) {
    const auto next = from_server.take();
    if (!next) break;
    const entry& e = *next;
    const auto it = calls.find(e.id);
    if (it == calls.end() || it->second.server_done)
      return fail_all(make_error_code(errc::protocol_violation));
    call& c = it->second;
    switch (static_cast<entry_kind>(e.kind)) {
      case entry_kind::reply:
        if (!in_arena(e.offset, e.length, layout.reply_arena_size)) {
          return fail_all(make_error_code(errc::protocol_violation));
        }
        c.has_reply = true;
        c.reply_offset = e.offset;
        c.reply_length = e.length;
        break;
      case entry_kind::aborted:
        if (!c.error) c.error = make_error_code(boost::asio::error::operation_aborted);
        break;
      case entry_kind::failed:
        if (e.status == 0 || e.status > static_cast<std::uint32_t>(errc::stopped)) {
          return fail_all(make_error_code(errc::protocol_violation));
        }
        if (!c.error) c.error = make_error_code(static_cast<errc>(e.status));
        break;
      default:
        return fail_all(make_error_code(errc::protocol_violation));
    }
    c.server_done = true;
    --in_flight;
    request_space.free(c.block);
    if (c.abandoned) {
      if (c.has_reply) (void)push({static_cast<std::uint32_t>(entry_kind::dispose), 0, e.id, 0, 0});
      calls.erase(it);
      continue;
    }
    finish_async(e.id, c);
    if (c.delivered) calls.erase(it);
  }
  from_server.release();
  flush_backlog();
}

void client_core::check_server() {
  if (closed) return;
  // The server says when it ends a connection; only a wait that brought no
  // news asks the kernel whether it died without a word (a system call).
  const bool said = shared->server_closed.load(std::memory_order_acquire) != 0;
  if (said || (!maybe_ready() &&
               (server_pidfd ? pidfd_exited(server_pidfd.get()) : !process_alive(server.pid)))) {
    // The control line says why, when the server said (a protocol violation).
    auto r = ctrl.receive(clock::now() + std::chrono::milliseconds(100));
    error_code why = r ? error_code{} : r.error();
    if (!why || why.category() != caps_category()) why = make_error_code(errc::disconnected);
    fail_all(why);
  }
}

void client_core::wait_for_news(clock::time_point deadline) {
  auto& policy = wait_policy::this_thread();
  const auto budget = policy.spin_budget(options.max_spin);
  const auto start = budget.count() > 0 ? clock::now() : clock::time_point{};
  if (policy.spin_then_yield(options.max_spin, budget, start, deadline,
                             [this] { return maybe_ready(); }))
    return;
  // Pairs with the server's bump of reply_seq and its load of client_sleepers.
  shared->client_sleepers.fetch_add(1, std::memory_order_seq_cst);
  const std::uint32_t seq = shared->reply_seq.load(std::memory_order_seq_cst);
  if (!maybe_ready()) {
    // In slices: a server killed without a word is noticed within one.
    const auto slice = clock::now() + std::chrono::milliseconds(50);
    (void)futex::wait_until(shared->reply_seq, seq, std::min(deadline, slice));
  }
  shared->client_sleepers.fetch_sub(1, std::memory_order_seq_cst);
}

void client_core::run_completions() {
  // Most calls collect none: they take no lock. Whoever collects runs them.
  if (!completions_waiting.load(std::memory_order_acquire)) return;
  std::vector<std::function<void()>> ready;
  {
    std::lock_guard lock(mutex);
    ready.swap(completions);
    completions_waiting.store(false, std::memory_order_relaxed);
  }
  for (auto& f : ready) f();
}

result<message_id> client_core::send(std::size_t size,
                                     const std::function<void(std::span<std::byte>)>& fill,
                                     clock::time_point deadline,
                                     client::call_handler* async_handler) {
  if (size > layout.request_arena_size) return make_error_code(errc::message_too_large);
  std::unique_lock lock(mutex);
  std::optional<std::uint64_t> block;
  bool drained = false;
  for (;;) {
    if (auto ec = usable()) return ec;
    if (in_flight < max_in_flight) {
      const auto free = to_server.free_entries(static_cast<std::uint32_t>(backlog.size()) + 1);
      if (!free) {
        fail_all(make_error_code(errc::protocol_violation));
        continue;
      }
      if (*free > backlog.size() && (block = request_space.allocate(size))) break;
    }
    // No room: what came back may free some. Then wait, if the caller waits.
    if (!drained) {
      drain(lock);
      drained = true;
      continue;
    }
    if (!options.wait_for_slot || async_handler != nullptr)
      return make_error_code(errc::no_buffers);
    if (clock::now() >= deadline) return make_error_code(errc::timed_out);
    ring_server();  // a server asleep must read our ring to free it
    lock.unlock();
    wait_for_news(deadline);
    lock.lock();
    check_server();
    drained = false;
  }
  const message_id id = next_id++;
  ++in_flight;  // the slot is ours from here: other senders must see it taken
  // Filled with the mutex released: the block is ours and nobody else's.
  lock.unlock();
  fill(std::span(request_arena + *block, size));
  lock.lock();
  if (auto ec = usable()) return ec;
  // Constructed, never assigned: Boost 1.81's any_completion_handler move
  // assignment recurses without end.
  if (async_handler != nullptr) {
    calls.emplace(id, call{.block = *block, .handler = std::move(*async_handler)});
    ++async_waiting;
  } else {
    calls.emplace(id, call{.block = *block, .handler = {}});
  }
  flush_backlog();
  if (!push({static_cast<std::uint32_t>(entry_kind::request), 0, id, *block, size})) {
    fail_all(make_error_code(errc::protocol_violation));
    return closed;
  }
  ring_server();
  return id;
}

result<reply> client_core::wait(message_id id, clock::time_point deadline) {
  std::unique_lock lock(mutex);
  for (;;) {
    drain(lock);
    const auto it = calls.find(id);
    if (it == calls.end() || it->second.delivered || it->second.handler) {
      return make_error_code(errc::unknown_message);
    }
    call& c = it->second;
    if (c.error || c.has_reply) {
      c.delivered = true;
      if (c.error) {
        const auto ec = c.error;
        if (c.server_done) calls.erase(it);
        return ec;
      }
      auto r = make_reply(id, c);
      calls.erase(it);
      return r;
    }
    if (auto ec = usable()) return ec;
    if (clock::now() >= deadline) return make_error_code(errc::timed_out);
    lock.unlock();
    wait_for_news(deadline);
    lock.lock();
    check_server();
  }
}

result<bool> client_core::abort(message_id id, error_code outcome) {
  std::unique_lock lock(mutex);
  drain(lock);
  const auto it = calls.find(id);
  if (it == calls.end() || it->second.delivered) {
    return result<bool>(boost::system::in_place_error, make_error_code(errc::unknown_message));
  }
  call& c = it->second;
  if (c.has_reply || c.error) return false;  // the outcome is in: it stands
  c.abandoned = true;
  c.error = outcome;
  finish_async(id, c);
  if (!closed) {
    if (!push({static_cast<std::uint32_t>(entry_kind::abort), 0, id, 0, 0})) {
      fail_all(make_error_code(errc::protocol_violation));
    } else {
      ring_server();
    }
  }
  lock.unlock();
  run_completions();
  return true;
}

void client_core::dispose(message_id id) noexcept {
  std::lock_guard lock(mutex);
  if (closed || fork.forked_copy()) return;
  // Not rung: the server reads it with the next request, or when it needs the space.
  if (!push({static_cast<std::uint32_t>(entry_kind::dispose), 0, id, 0, 0})) {
    fail_all(make_error_code(errc::protocol_violation));
  }
}

void client_core::listen() {
  // With the mutex held. The bell rings only while client_listening is set.
  if (async_waiting == 0) return;
  shared->client_listening.store(1, std::memory_order_seq_cst);
  auto self = shared_from_this();
  if (!bell_armed) {
    bell_armed = true;
    bell_desc.async_wait(asio::posix::stream_descriptor::wait_read, [self](error_code ec) {
      clear_bell(self->bell.get());
      {
        std::unique_lock lock(self->mutex);
        self->bell_armed = false;
        self->drain(lock);
        if (!ec) self->check_server();
        if (self->async_waiting > 0 && !self->closed && !ec) {
          self->listen();
        } else {
          self->shared->client_listening.store(0, std::memory_order_seq_cst);
        }
      }
      self->run_completions();
    });
  }
  if (!pidfd_armed && pidfd_desc.is_open()) {
    pidfd_armed = true;
    pidfd_desc.async_wait(asio::posix::stream_descriptor::wait_read, [self](error_code ec) {
      {
        std::lock_guard lock(self->mutex);
        self->pidfd_armed = false;
        if (!ec) self->fail_all(make_error_code(errc::disconnected));
      }
      self->run_completions();
    });
  }
}

}  // namespace detail

// ---- reply -------------------------------------------------------------------------

reply::reply(reply&& other) noexcept
    : core_(std::move(other.core_)), id_(other.id_), data_(other.data_), length_(other.length_) {
  other.data_ = nullptr;
  other.length_ = 0;
}

reply& reply::operator=(reply&& other) noexcept {
  if (this != &other) {
    release();
    core_ = std::move(other.core_);
    id_ = other.id_;
    data_ = std::exchange(other.data_, nullptr);
    length_ = std::exchange(other.length_, 0);
  }
  return *this;
}

reply::~reply() { release(); }

std::string reply::copy() const { return {reinterpret_cast<const char*>(data_), length_}; }

void reply::release() noexcept {
  if (auto core = std::move(core_)) core->dispose(id_);
  data_ = nullptr;
  length_ = 0;
}

// ---- client ------------------------------------------------------------------------

client::client(std::shared_ptr<detail::client_core> core) : core_(std::move(core)) {}

client::~client() {
  {
    std::lock_guard lock(core_->mutex);
    core_->fail_all(make_error_code(errc::stopped));
    boost::system::error_code ignored;
    core_->bell_desc.cancel(ignored);
    core_->pidfd_desc.cancel(ignored);
  }
  core_->run_completions();
  core_->ctrl.close();  // the server sees us go: every message of ours is disposed
}

namespace {
void copy_into(std::span<const std::byte> from, std::span<std::byte> to) {
  if (!from.empty()) std::memcpy(to.data(), from.data(), from.size());
}
}  // namespace

result<reply> client::call(std::span<const std::byte> request, clock::time_point deadline) {
  return call_in_place(
      request.size(), [request](std::span<std::byte> to) { copy_into(request, to); }, deadline);
}

result<reply> client::call_in_place(std::size_t size,
                                    const std::function<void(std::span<std::byte>)>& fill,
                                    clock::time_point deadline) {
  auto id = core_->send(size, fill, deadline, nullptr);
  if (!id) return id.error();
  auto r = core_->wait(*id, deadline);
  if (!r && r.error() == make_error_code(errc::timed_out)) {
    auto aborted = core_->abort(*id, make_error_code(errc::timed_out));
    if (aborted && !*aborted) r = core_->wait(*id, deadline);  // the reply came meanwhile
  }
  core_->run_completions();  // async calls whose replies this thread read
  return r;
}

result<message_id> client::send(std::span<const std::byte> request) {
  return core_->send(
      request.size(), [request](std::span<std::byte> to) { copy_into(request, to); },
      clock::time_point::max(), nullptr);
}

result<message_id> client::send_in_place(std::size_t size,
                                         const std::function<void(std::span<std::byte>)>& fill) {
  return core_->send(size, fill, clock::time_point::max(), nullptr);
}

result<reply> client::wait(message_id id, clock::time_point deadline) {
  auto r = core_->wait(id, deadline);
  core_->run_completions();
  return r;
}

result<bool> client::abort(message_id id) {
  return core_->abort(id, make_error_code(boost::asio::error::operation_aborted));
}

void client::start_call(std::span<const std::byte> request, call_handler handler) {
  auto slot = asio::get_associated_cancellation_slot(handler);
  auto id = core_->send(
      request.size(), [request](std::span<std::byte> to) { copy_into(request, to); },
      clock::time_point::max(), &handler);
  if (!id) {
    if (handler) {
      detail::post_completion(core_->ctx, std::move(handler), id.error(), reply{});
    } else {
      core_->run_completions();
    }
    return;
  }
  if (slot.is_connected()) {
    slot.assign([weak = std::weak_ptr(core_), id = *id](asio::cancellation_type) {
      if (auto core = weak.lock())
        (void)core->abort(id, make_error_code(boost::asio::error::operation_aborted));
    });
  }
  {
    // Listening first, then reading: a reply published before the server
    // could see us listening is read here, one after it rings the bell.
    std::unique_lock lock(core_->mutex);
    core_->listen();
    core_->drain(lock);
  }
  core_->run_completions();
}

const peer_credentials& client::server() const noexcept { return core_->server; }
std::uint64_t client::generation() const noexcept { return core_->generation; }
gid_t client::point_gid() const noexcept { return core_->gid; }

std::size_t client::in_flight() const {
  std::size_t n;
  {
    std::unique_lock lock(core_->mutex);
    core_->drain(lock);
    n = core_->in_flight;
  }
  core_->run_completions();
  return n;
}

error_code client::close_reason() const {
  std::lock_guard lock(core_->mutex);
  return core_->closed;
}

}  // namespace uipc::caps
