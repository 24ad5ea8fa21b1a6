// The dispatcher: the seed's receive, restart, add, detach and event-return flows
// over one socket group, with recvmmsg/sendmmsg batching. This file: creation, options,
// stats, the public handles, keys and engine setup; the flows are in parties.cpp,
// receive.cpp and send.cpp.
#include <linux/filter.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
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
#include <tuple>

#include "engine.hpp"

namespace uipc::dispatch {

namespace asio = boost::asio;
using detail::engine;
using detail::party;

// ---------------------------------------------------------------- event, handles

void event::return_to_party() noexcept { party_->engine_->return_event(*this); }

response& response::operator=(response&& other) noexcept {
  if (this != &other) {
    detach();
    party_ = std::exchange(other.party_, nullptr);
  }
  return *this;
}

std::uint16_t response::id() const noexcept { return party_ ? party_->key_.id : 0; }

port_mode response::ports() const noexcept { return party_ ? party_->mode_ : port_mode::shared; }

std::uint16_t response::local_port() const noexcept { return party_ ? party_->local_port_ : 0; }

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
void start_receive(party_ref ref, receive_handler handler, bool loop_executor) {
  start_receive(ref.get(), std::move(handler), loop_executor);
}

void start_receive(party* p, receive_handler handler, bool loop_executor) {
  if (p == nullptr) {
    // An empty handle has no loop to post to: the one completion that runs inline.
    std::move(handler)(make_error_code(errc::detached), event{});
    return;
  }
  p->engine_->start_receive(p, std::move(handler), loop_executor);
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

engine::engine(asio::io_context& ctx, const dispatcher_options& options,
               std::unique_ptr<buffer_pool> pool)
    : ctx_(ctx),
      options_(options),
      pool_(std::move(pool)),
      timer_(ctx),
      registration_(ctx, *this) {}

engine::~engine() {
  // Every buffer is back by now: queues were emptied in close(), events keep the
  // dispatcher (and so this engine) alive, and receive handlers hold a reference.
  assert(pool_->in_use() == 0);
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
    if (count > 1 || options_.separate_send_sockets) {
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
    s->spent_buffers.resize(64);
    s->batch_replies.reserve(batch);
    sockets_.push_back(std::move(s));
  }
  if (options_.separate_send_sockets) {
    if (auto opened = open_send_sockets(); !opened) return opened;
  }
  idle_sockets_.store(count);
  return {};
}

result<void> engine::open_send_sockets() {
  // First the filter, for the whole SO_REUSEPORT group: a datagram goes to a
  // receiving socket (they joined the group first, so they are its sockets
  // 0..count-1), by its message ID when there are several; a datagram too
  // short to load the ID from goes to socket 0. Sockets that join later (the
  // send sockets, or another process's) are never chosen.
  const auto count = static_cast<std::uint32_t>(sockets_.size());
  std::array<sock_filter, 3> code{};
  unsigned length = 0;
  if (count == 1) {
    code[length++] = BPF_STMT(BPF_RET | BPF_K, 0);
  } else {
    code[length++] =
        BPF_STMT(BPF_LD | BPF_H | BPF_ABS, static_cast<std::uint32_t>(options_.frame.id_offset));
    code[length++] = BPF_STMT(BPF_ALU | BPF_MOD | BPF_K, count);
    code[length++] = BPF_STMT(BPF_RET | BPF_A, 0);
  }
  const sock_fprog program{static_cast<unsigned short>(length), code.data()};
  if (::setsockopt(sockets_[0]->fd, SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &program,
                   sizeof program) != 0)
    return errno_code(errno);
  const bool v6 = local_.address().is_v6();
  for (auto& s : sockets_) {
    const int fd = ::socket(v6 ? AF_INET6 : AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return errno_code(errno);
    s->send_fd = fd;  // closed with the socket_state from here on
    const int one = 1;
    if (::setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0 ||
        (v6 && ::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one) != 0))
      return errno_code(errno);
    if (options_.socket_buffer_bytes > 0) {
      const int bytes = options_.socket_buffer_bytes;
      (void)::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes);  // smaller is not fatal
    }
    if (::bind(fd, local_.data(), static_cast<socklen_t>(local_.size())) != 0)
      return errno_code(errno);
  }
  return {};
}

socket_state::~socket_state() {
  if (send_fd >= 0) ::close(send_fd);
}

void engine::close() noexcept {
  fifo<queued_message> dropped;
  {
    std::lock_guard lock(mutex_);
    closed_ = true;
    shutting_down_ = true;
    stopping_.store(true, std::memory_order_relaxed);
    dropped.swap(queries_);
    lent_buffers_ = 0;
    timer_.cancel();
  }
  // Exclusive reads waiting for a buffer hold the engine: let them go. The
  // exclusive sockets of responses are all closed (the responses held the
  // dispatcher); the kept ones close now.
  close_kept();
  pool_->cancel();
  {
    std::lock_guard lock(slots_mutex_);
    exclusive_set_.reset();  // closes the set; a pending wait ends as cancelled
  }
  for (auto& s : sockets_) {
    fifo<outgoing> unsent;
    {
      std::lock_guard io(s->io_mutex);
      s->closed = true;
      error_code ignored;
      s->socket.close(ignored);
      if (s->send_fd >= 0) ::close(std::exchange(s->send_fd, -1));
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
  st.exclusive_received = exclusive_received_.load(std::memory_order_relaxed);
  st.exclusive_dropped_unmatched = exclusive_dropped_unmatched_.load(std::memory_order_relaxed);
  st.exclusive_port_redraws = exclusive_port_redraws_.load(std::memory_order_relaxed);
  st.exclusive_socket_errors = exclusive_socket_errors_.load(std::memory_order_relaxed);
  st.exclusive_no_port = exclusive_no_port_.load(std::memory_order_relaxed);
  st.exclusive_reused = exclusive_reused_.load(std::memory_order_relaxed);
  st.buffers_in_use = pool_->in_use();
  for (const auto& s : sockets_) {
    std::lock_guard io(s->io_mutex);  // before mutex_: io_mutex comes first
    st.send_sockets += s->send_fd >= 0 ? 1 : 0;
  }
  std::lock_guard lock(mutex_);
  st.buffers_lent = lent_buffers_;
  st.queued_queries = queries_.size();
  st.responses = responses_.size() + exclusive_.size();
  st.exclusive_open = exclusive_reserved_;
  st.exclusive_kept = kept_count_;
  st.port_waiters = port_waiters_.size();
  st.listeners = listeners_.size();
  for (const auto& s : sockets_) st.receiving_sockets += s->receiving ? 1 : 0;
  st.shutting_down = shutting_down_;
  st.receiving_stopped = receiving_stopped_.load(std::memory_order_relaxed);
  return st;
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
      options.sockets > 64 || options.max_queued_per_response == 0 || options.port_uses == 0 ||
      options.port_lifetime.count() < 0)
    return make_error_code(errc::bad_options);
  // The exclusive ports' range: both ends given, or neither (the system's).
  std::uint16_t first_port = options.first_port, last_port = options.last_port;
  std::uint32_t recent_ports = options.recent_ports;
  if ((first_port == 0) != (last_port == 0) || first_port > last_port)
    return make_error_code(errc::bad_options);
  if (first_port == 0) {
    std::tie(first_port, last_port) = detail::system_port_range();
    recent_ports = std::min<std::uint32_t>(recent_ports, (last_port - first_port + 1u) / 2);
  }
  if (recent_ports >= last_port - first_port + 1u) return make_error_code(errc::bad_options);
  // The pool is allocated up front: a size that overflows, or that cannot be
  // allocated, is a bad option, not an exception out of create().
  constexpr std::size_t max_pool_bytes = std::size_t{1} << 40;
  if (options.buffer_size > max_pool_bytes / options.buffers)
    return make_error_code(errc::bad_options);
  auto pool = buffer_pool::create(context.get_executor(), options.buffer_size, options.buffers);
  if (!pool) return make_error_code(errc::bad_options);
  try {
    auto e = std::make_shared<detail::engine>(context, options, std::move(*pool));
    e->hold_registration();
    e->set_port_range(first_port, last_port, recent_ports);
    if (auto opened = e->open(local); !opened) return opened.error();
    return ref_ptr<dispatcher>(new dispatcher(
        std::move(e)));  // NOLINT(cppcoreguidelines-owning-memory): adopted by the ref
  } catch (const std::bad_alloc&) {
    return make_error_code(errc::bad_options);
  }
}

result<response> dispatcher::add_response(const udp::endpoint& peer,
                                          const response_options& options) {
  return engine_->add_response(*this, peer, options);
}

result<listener> dispatcher::add_listener() { return engine_->add_listener(*this); }

void dispatcher::start_add_response(const udp::endpoint& peer, const response_options& options,
                                    add_handler handler) {
  engine_->start_add_response(*this, peer, options, std::move(handler));
}

udp::endpoint dispatcher::local_endpoint() const { return engine_->local_endpoint(); }

std::vector<int> dispatcher::native_handles() const { return engine_->native_handles(); }

const framing& dispatcher::frame() const noexcept { return engine_->frame(); }

dispatcher_stats dispatcher::stats() const { return engine_->stats(); }

void dispatcher::stop_receiving() { engine_->stop_receiving(); }
void dispatcher::shutdown() { engine_->fail(asio::error::operation_aborted, /*from_loop=*/false); }

}  // namespace uipc::dispatch
