// Exclusive ports (port_mode::exclusive): a response on a socket of its own,
// bound to a port drawn from a CSPRNG and connected to its peer, on the shared
// loop. This file: drawing ports, opening and closing the sockets, the bounded
// set of them and its waiters. Reading, sending and errors: exclusive_io.cpp.
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <boost/asio/append.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/post.hpp>
#include <cerrno>
#include <cstdlib>  // arc4random_buf (glibc 2.36)
#include <cstring>
#include <fstream>
#include <new>

#include "engine.hpp"

namespace uipc::dispatch::detail {

namespace asio = boost::asio;

// ---------------------------------------------------------------- drawing ports

port_draw::port_draw(std::uint16_t first, std::uint16_t last, std::uint32_t recent)
    : first_(first), last_(last), limit_(recent), recent_set_(65536, false) {
  recent_.reserve(limit_);
}

std::uint16_t port_draw::draw() {
  // Rejection sampling over 32-bit draws: uniform over the range, with no
  // modulo bias (an attacker's best guess stays 1 / range).
  const std::uint32_t n = size();
  const std::uint32_t bound = static_cast<std::uint32_t>(0x100000000ULL - 0x100000000ULL % n);
  for (;;) {
    if (random_left_ == 0) {
      ::arc4random_buf(random_.data(), sizeof random_);  // getrandom-backed CSPRNG
      random_left_ = random_.size();
    }
    const std::uint32_t r = random_[--random_left_];
    if (bound == 0 || r < bound) return static_cast<std::uint16_t>(first_ + r % n);
  }
}

void port_draw::released(std::uint16_t port) {
  if (limit_ == 0) return;
  if (recent_.size() < limit_) {
    recent_.push_back(port);  // capacity reserved: no allocation
  } else {
    recent_set_[recent_[next_]] = false;
    recent_[next_] = port;
    next_ = (next_ + 1) % limit_;
  }
  recent_set_[port] = true;
}

std::pair<std::uint16_t, std::uint16_t> system_port_range() {
  std::ifstream in("/proc/sys/net/ipv4/ip_local_port_range");
  unsigned first = 0, last = 0;
  if (in >> first >> last && first > 0 && first <= last && last <= 65535)
    return {static_cast<std::uint16_t>(first), static_cast<std::uint16_t>(last)};
  return {32768, 60999};
}

// ---------------------------------------------------------------- the bounded set

error_code engine::reserve_exclusive_locked(socket_list& closing) {
  if (shutting_down_) return make_error_code(errc::shutting_down);
  if (options_.exclusive_sockets == 0) return make_error_code(errc::bad_options);
  // Waiters first: a new caller does not overtake them. (No socket is kept
  // while any wait: keep_exclusive_locked gives way to them.)
  if (!port_waiters_.empty() ||
      (exclusive_reserved_ >= options_.exclusive_sockets && kept_count_ == 0)) {
    exclusive_no_port_.fetch_add(1, std::memory_order_relaxed);
    return make_error_code(errc::no_free_port);
  }
  if (exclusive_reserved_ >= options_.exclusive_sockets) {
    // At the limit: a kept socket, a possible saving, gives its place to a
    // transaction that needs one now. keep_exclusive_locked leaves no empty
    // list; one is skipped all the same rather than trusted (back() on it
    // would be undefined).
    auto it = kept_.begin();
    while (it != kept_.end() && it->second.empty()) it = kept_.erase(it);
    if (it == kept_.end()) {  // kept_count_ was wrong: no socket to take the place of
      exclusive_no_port_.fetch_add(1, std::memory_order_relaxed);
      return make_error_code(errc::no_free_port);
    }
    closing.push_back(std::move(it->second.back()));  // room: take_kept_locked leaves one
    it->second.pop_back();
    if (it->second.empty()) kept_.erase(it);
    --kept_count_;
    --exclusive_reserved_;
  }
  ++exclusive_reserved_;
  return {};
}

void engine::unreserve_exclusive() noexcept {
  {
    std::lock_guard lock(mutex_);
    --exclusive_reserved_;
  }
  serve_port_waiters();
}

std::shared_ptr<exclusive_socket> engine::take_kept_locked(const peer_key& peer,
                                                           socket_list& closing) {
  if (kept_count_ == 0 || shutting_down_) return nullptr;
  const auto now = std::chrono::steady_clock::now();
  if (now >= next_sweep_) {
    // Ports kept for peers no longer asked close within about a lifetime and a half.
    sweep_kept_locked(closing, false, 1);  // room for reserve_exclusive_locked's
    next_sweep_ = now + options_.port_lifetime / 2;
  }
  auto it = kept_.find(peer);
  if (it == kept_.end()) return nullptr;
  std::shared_ptr<exclusive_socket> found;
  socket_list& unused = closing;
  auto& list = it->second;
  while (!list.empty() && !found && unused.size() + 1 < unused.capacity()) {
    auto xs = std::move(list.back());
    list.pop_back();
    --kept_count_;
    if (!xs->spoiled && now - xs->opened < options_.port_lifetime) {
      found = std::move(xs);
    } else {
      --exclusive_reserved_;
      unused.push_back(std::move(xs));
    }
  }
  if (list.empty()) kept_.erase(it);
  return found;
}

void engine::sweep_kept_locked(socket_list& closing, bool all, std::size_t room) {
  const auto now = std::chrono::steady_clock::now();
  const std::size_t limit = closing.capacity() - room;
  for (auto it = kept_.begin(); it != kept_.end() && closing.size() < limit;) {
    auto& list = it->second;
    for (std::size_t i = 0; i < list.size() && closing.size() < limit;) {
      if (all || list[i]->spoiled || now - list[i]->opened >= options_.port_lifetime) {
        closing.push_back(std::move(list[i]));
        list[i] = std::move(list.back());
        list.pop_back();
        --kept_count_;
        --exclusive_reserved_;
      } else {
        ++i;
      }
    }
    it = list.empty() ? kept_.erase(it) : std::next(it);
  }
}

void engine::close_set_aside(socket_list& closing) noexcept {
  if (closing.empty()) return;
  for (auto& xs : closing) close_exclusive(*xs);
  closing.clear();
  serve_port_waiters();  // their places were given back when they were set aside
}

void engine::close_kept() noexcept {
  for (;;) {
    socket_list closing;
    {
      std::lock_guard lock(mutex_);
      sweep_kept_locked(closing, /*all=*/true);
    }
    if (closing.empty()) return;
    close_set_aside(closing);
  }
}

bool engine::keep_exclusive_locked(party& p, const std::shared_ptr<exclusive_socket>& xs) noexcept {
  // A transaction that did not end well may still have datagrams coming (a
  // late reply, an ICMP error): its port closes, and they find no socket. One
  // that sent more than one datagram too: the peer answered the first, but
  // may have gone before a later one came, whose ICMP error is still on its
  // way. One datagram, answered, leaves nothing legitimate to come; what may
  // still come is dropped (another ID), and an error spoils the port.
  if (!p.answered_ || p.exclusive_sends_ != 1 || p.failed_ || xs->spoiled || shutting_down_ ||
      !port_waiters_.empty() || xs->uses >= options_.port_uses ||
      std::chrono::steady_clock::now() - xs->opened >= options_.port_lifetime)
    return false;
  auto it = kept_.end();
  try {
    it = kept_.try_emplace(p.key_.peer).first;
    it->second.push_back(xs);
  } catch (const std::bad_alloc&) {
    // No empty list stays behind: reserve_exclusive_locked takes a socket
    // from the first list it finds.
    if (it != kept_.end() && it->second.empty()) kept_.erase(it);
    return false;
  }
  ++kept_count_;
  return true;
}

result<std::shared_ptr<exclusive_socket>> engine::open_exclusive(const udp::endpoint& peer) {
  const bool v6 = local_.address().is_v6();
  const int fd = ::socket(v6 ? AF_INET6 : AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return errno_code(errno);
  struct fd_guard {
    explicit fd_guard(int f) noexcept : fd(f) {}
    int fd;
    fd_guard(const fd_guard&) = delete;
    fd_guard& operator=(const fd_guard&) = delete;
    ~fd_guard() {
      if (fd >= 0) ::close(fd);
    }
  } guard(fd);
  if (v6) {
    const int one = 1;
    if (::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one) != 0)
      return errno_code(errno);
  }
  udp::endpoint at = local_;
  std::uint16_t port = 0;
  {
    std::lock_guard lock(port_mutex_);
    port_draw& draw = *ports_;
    auto try_bind = [&](std::uint16_t candidate) -> error_code {
      at.port(candidate);
      if (::bind(fd, at.data(), static_cast<socklen_t>(at.size())) == 0) return {};
      return errno_code(errno);
    };
    // Random draws; a busy port is drawn again. When many fail (most of the
    // range busy), one pass over the range from a random start settles it.
    error_code ec = make_error_code(errc::no_free_port);
    for (int tries = 0; tries < 64 && ec; ++tries) {
      const std::uint16_t candidate = draw.draw();
      if (draw.recent(candidate)) continue;
      ec = try_bind(candidate);
      if (ec == boost::system::errc::address_in_use) {
        exclusive_port_redraws_.fetch_add(1, std::memory_order_relaxed);
      } else if (!ec) {
        port = candidate;
      } else {
        return ec;
      }
    }
    if (port == 0) {
      const std::uint32_t start = draw.draw() - draw.first();
      for (std::uint32_t i = 0; i < draw.size() && port == 0; ++i) {
        const auto candidate = static_cast<std::uint16_t>(draw.first() + (start + i) % draw.size());
        if (draw.recent(candidate)) continue;
        ec = try_bind(candidate);
        if (!ec) {
          port = candidate;
        } else if (ec != boost::system::errc::address_in_use) {
          return ec;
        }
      }
    }
    if (port == 0) {
      exclusive_no_port_.fetch_add(1, std::memory_order_relaxed);
      return make_error_code(errc::no_free_port);
    }
  }
  // Connected: the kernel delivers to this socket only datagrams from the peer's
  // address and port, and reports the peer's ICMP errors on it.
  if (::connect(fd, peer.data(), static_cast<socklen_t>(peer.size())) != 0)
    return errno_code(errno);
  auto xs = std::make_shared<exclusive_socket>();
  xs->fd = std::exchange(guard.fd, -1);  // owned by xs from here on
  xs->port = port;
  xs->peer = peer;
  xs->opened = std::chrono::steady_clock::now();
  return xs;
}

result<response> engine::add_exclusive(dispatcher& owner, const udp::endpoint& peer,
                                       const response_options& options) {
  if (peer.address().is_v6() != local_.address().is_v6())
    return make_error_code(asio::error::address_family_not_supported);
  std::shared_ptr<exclusive_socket> kept;
  socket_list closing;
  error_code ec;
  {
    std::lock_guard lock(mutex_);
    kept = take_kept_locked(peer_key::of(peer), closing);
    if (!kept) ec = reserve_exclusive_locked(closing);
  }
  close_set_aside(closing);
  if (ec) return ec;
  return open_and_attach(owner, peer, options, std::move(kept));
}

result<response> engine::open_and_attach(dispatcher& owner, const udp::endpoint& peer,
                                         const response_options& options,
                                         std::shared_ptr<exclusive_socket> kept) {
  if (kept) {
    exclusive_reused_.fetch_add(1, std::memory_order_relaxed);
    return attach_exclusive(owner, peer, options, std::move(kept));
  }
  result<std::shared_ptr<exclusive_socket>> xs = make_error_code(errc::no_free_port);
  try {
    xs = open_exclusive(peer);
  } catch (const std::bad_alloc&) {
    xs = make_error_code(boost::system::errc::not_enough_memory);
  }
  if (!xs) {
    unreserve_exclusive();
    return xs.error();
  }
  if (auto ec = watch_exclusive(*xs)) {
    close_exclusive(**xs);
    unreserve_exclusive();
    return ec;
  }
  return attach_exclusive(owner, peer, options, std::move(*xs));
}

result<response> engine::attach_exclusive(dispatcher& owner, const udp::endpoint& peer,
                                          const response_options& options,
                                          std::shared_ptr<exclusive_socket> xs) {
  std::unique_ptr<party> p;
  error_code refused;
  try {
    p = std::make_unique<party>(*this, ref_ptr<dispatcher>(&owner), party::role::response);
    p->peer_ = peer;
    p->mode_ = port_mode::exclusive;
    p->local_port_ = xs->port;
    std::lock_guard lock(mutex_);
    if (shutting_down_) {
      refused = make_error_code(errc::shutting_down);
    } else {
      // Any ID will do (the port and the connected peer tell transactions
      // apart); still unpredictable, so a forger who finds the port must guess
      // it, and never the port's previous one, so that a duplicate of the
      // previous reply is not taken for this one's.
      std::uint16_t id = next_random_locked();
      while (xs->uses != 0 && id == xs->last_id) id = next_random_locked();
      p->key_ = {peer_key::of(peer), id};
      p->serial_ = next_serial_++;
      exclusive_.push_back(p.get());  // may throw: nothing else changed yet
      p->exclusive_slot_ = exclusive_.size() - 1;
      try {
        if (options.timeout.count() > 0) link_timeout_locked(*p, options.timeout);
      } catch (...) {
        exclusive_.pop_back();
        throw;
      }
      xs->last_id = id;
      ++xs->uses;
      p->exclusive_ = xs;
      xs->owner = p.get();
      activate_exclusive(*xs);
    }
  } catch (const std::bad_alloc&) {
    refused = make_error_code(boost::system::errc::not_enough_memory);
  }
  if (refused) {
    close_exclusive(*xs);
    unreserve_exclusive();
    return refused;
  }
  return response(p.release());
}

void engine::detach_exclusive_locked(party& p,
                                     std::shared_ptr<exclusive_socket>& closing) noexcept {
  unlink_timeout_locked(p);
  exclusive_[p.exclusive_slot_] = exclusive_.back();
  exclusive_[p.exclusive_slot_]->exclusive_slot_ = p.exclusive_slot_;
  exclusive_.pop_back();
  std::shared_ptr<exclusive_socket> xs = std::move(p.exclusive_);
  xs->owner = nullptr;
  park_exclusive(*xs);
  if (!keep_exclusive_locked(p, xs)) closing = std::move(xs);
}

void engine::close_exclusive(exclusive_socket& xs) noexcept {
  {
    std::lock_guard io(xs.io_mutex);
    if (xs.closed) return;
    xs.closed = true;
    ::close(std::exchange(xs.fd, -1));  // which also takes it out of the epoll set
  }
  unwatch_exclusive(xs);
  std::lock_guard lock(port_mutex_);
  ports_->released(xs.port);
}

exclusive_socket::~exclusive_socket() {
  if (fd >= 0) ::close(fd);
}

void engine::start_add_response(dispatcher& owner, const udp::endpoint& peer,
                                const response_options& options,
                                asio::any_completion_handler<void(error_code, response)> handler) {
  auto complete = [&](result<response> r) {
    if (r) {
      asio::post(ctx_, asio::append(std::move(handler), error_code{}, std::move(*r)));
    } else {
      asio::post(ctx_, asio::append(std::move(handler), r.error(), response{}));
    }
  };
  if (mode_of(options) == port_mode::shared) {
    complete(add_response(owner, peer, options));
    return;
  }
  if (peer.address().is_v6() != local_.address().is_v6()) {
    complete(make_error_code(asio::error::address_family_not_supported));
    return;
  }
  error_code ec;
  std::shared_ptr<exclusive_socket> kept;
  socket_list closing;
  {
    std::lock_guard lock(mutex_);
    kept = take_kept_locked(peer_key::of(peer), closing);
    if (!kept) ec = reserve_exclusive_locked(closing);
    // Wait only while some exclusive socket is open or opening: its release
    // will serve the waiter. Otherwise nothing would ever come back.
    if (ec == errc::no_free_port && exclusive_reserved_ > 0) {
      try {
        port_waiters_.push_back(std::make_unique<port_waiter>(
            port_waiter{ref_ptr<dispatcher>(&owner), peer, options, {}}));
        port_waiters_.back()->handler.swap(handler);
        ec = {};
      } catch (const std::bad_alloc&) {
        ec = make_error_code(boost::system::errc::not_enough_memory);
      }
    }
  }
  close_set_aside(closing);
  if (!handler) return;  // waiting
  if (ec) {
    complete(ec);
    return;
  }
  complete(open_and_attach(owner, peer, options, std::move(kept)));
}

void engine::serve_port_waiters() noexcept {
  bool continuing = false;  // this call is the one serving
  for (;;) {
    std::unique_ptr<port_waiter> w;
    {
      std::lock_guard lock(mutex_);
      // One thread serves at a time: a failed open gives its place back through
      // unreserve_exclusive, which must not recurse into here once per waiter.
      // The condition is checked, and serving given up, in one critical section,
      // so a place freed meanwhile by another thread is seen by one of us.
      if (serving_waiters_ && !continuing) return;
      if (port_waiters_.empty() || shutting_down_ ||
          exclusive_reserved_ >= options_.exclusive_sockets) {
        serving_waiters_ = false;
        return;
      }
      serving_waiters_ = true;
      continuing = true;
      w = std::move(port_waiters_.front());
      port_waiters_.pop_front();
      ++exclusive_reserved_;
    }
    result<response> r = open_and_attach(*w->owner, w->peer, w->options, nullptr);
    try {
      if (r) {
        asio::post(ctx_, asio::append(std::move(w->handler), error_code{}, std::move(*r)));
      } else {
        asio::post(ctx_, asio::append(std::move(w->handler), r.error(), response{}));
      }
    } catch (const std::bad_alloc&) {  // NOLINT(bugprone-empty-catch)
      // The post could not allocate: the handler is dropped with the waiter
      // (and the response, if any, detaches). Nothing better from a noexcept path.
    }
  }
}

}  // namespace uipc::dispatch::detail
