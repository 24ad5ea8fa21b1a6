// The dispatcher's send path: sends, replies, the per-socket send queue and its sendmmsg flush.
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

namespace detail {

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
  if (p->mode_ == port_mode::exclusive && p->role_ == party::role::response) {
    // The response's own socket: sent now, completed by a post.
    const result<void> sent = send_exclusive(p, message);
    asio::post(ctx_, asio::append(std::move(handler), sent ? error_code{} : sent.error()));
    return;
  }
  enqueue(send_socket(), outgoing{to, message.data(), message.size(), {}, std::move(handler)});
}

result<void> engine::send_copy(party* p, std::span<const std::byte> message) {
  if (p->mode_ == port_mode::exclusive) return send_exclusive(p, message);
  if (message.size() > pool_->buffer_size()) return make_error_code(errc::message_too_large);
  auto buffer = pool_->acquire();
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
  // The buffer moves on to be sent (still counted as lent until it is); the
  // event itself is returned, which lets the next query through.
  socket_state& s = *sockets_[held.socket_ < sockets_.size() ? held.socket_ : 0];
  // The usual answer loop: a handler of this socket's receive batch replies on
  // the thread that runs it. No lock here: the reply joins the batch's
  // sendmmsg, and the event's return is left to this thread's next lock (see
  // tl_returned). A shutdown meanwhile drops the reply at the flush, as it
  // drops any queued send. (p needs no check: its handle is attached, or the
  // call would not have come here.)
  error_code refused;
  if (tl_batch_socket == &s && tl_delivering == this &&
      !stopping_.load(std::memory_order_relaxed)) {
    if (tl_returned != nullptr) {
      // A second reply from one handler: the first one's return goes now.
      party* earlier;
      {
        std::lock_guard lock(mutex_);
        earlier = apply_deferred_return_locked(*tl_batch);
      }
      release(earlier);
    }
    try {
      s.batch_replies.emplace_back(held.peer_, held.buffer_.data(), answer.size(),
                                   std::move(held.buffer_), send_handler{});
      tl_returned = std::exchange(held.party_, nullptr);
      return {};
    } catch (const std::bad_alloc&) {
      refused = make_error_code(boost::system::errc::not_enough_memory);
    }
  }
  // Otherwise (another thread or socket, a shutdown, no memory): the event is
  // returned now, and the answer queued for the socket's next flush.
  party* owner = std::exchange(held.party_, nullptr);
  completions ready;
  {
    std::lock_guard lock(mutex_);
    if (!refused && !p->attached_) refused = make_error_code(errc::detached);
    if (!refused && shutting_down_) refused = make_error_code(errc::shutting_down);
    owner->lent_ = false;
    make_ready_locked(*owner, ready);
    if (refused && !closed_) --lent_buffers_;  // the buffer goes back below, not to a send queue
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

// Sends items[0, count) with sendmmsg until all are consumed (sent, or failed
// for their destination), the socket would block (a write wait is then armed)
// or fails; returns how many were consumed. Each consumed item's buffer goes
// back and its handler moves to `r`. Under s.io_mutex.
std::size_t engine::send_locked(socket_state& s, outgoing* items, std::size_t count,
                                send_results& r) {
  std::size_t consumed = 0;
  // The separate send socket when there is one; if its buffer is full, the
  // receiving socket takes over for the rest of this flush (and, when it is
  // full too, waits for room through the loop).
  int fd = s.send_fd >= 0 ? s.send_fd : s.fd;
  while (consumed < count && !s.closed && !s.write_wait && !r.socket_error) {
    const std::size_t n = std::min(count - consumed, s.send_headers.size());
    for (std::size_t i = 0; i < n; ++i) {
      outgoing& o = items[consumed + i];
      s.send_vectors[i] = {const_cast<std::byte*>(o.data),
                           o.size};  // NOLINT: iovec is not const-correct
      auto& h = s.send_headers[i].msg_hdr;
      h = {};
      h.msg_name = o.to.data();
      h.msg_namelen = static_cast<socklen_t>(o.to.size());
      h.msg_iov = &s.send_vectors[i];
      h.msg_iovlen = 1;
    }
    const int sent = ::sendmmsg(fd, s.send_headers.data(), static_cast<unsigned>(n), MSG_DONTWAIT);
    if (sent < 0) {
      const int err = errno;
      if (err == EINTR) continue;
      if ((err == EAGAIN || err == EWOULDBLOCK || err == ENOBUFS) && fd != s.fd) {
        fd = s.fd;
        continue;
      }
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
      outgoing& o = items[consumed++];
      send_errors_.fetch_add(1, std::memory_order_relaxed);
      if (o.handler) r.done.push_back({std::move(o.handler), errno_code(err)});
      if (o.buffer) ++r.returned;
      o.buffer.reset();
      if (!per_destination_error(err)) r.socket_error = errno_code(err);
      continue;
    }
    sent_.fetch_add(static_cast<std::uint64_t>(sent), std::memory_order_relaxed);
    std::size_t spent = 0;
    for (int i = 0; i < sent; ++i) {
      outgoing& o = items[consumed++];
      if (o.handler) r.done.push_back({std::move(o.handler), {}});
      if (o.buffer) s.spent_buffers[spent++] = std::move(o.buffer);
    }
    // Back to the pool together: one atomic operation for the lot.
    r.returned += static_cast<std::uint32_t>(spent);
    pool_->release(std::span(s.spent_buffers).first(spent));
  }
  return consumed;
}

void engine::flush(socket_state& s, bool batch_end) {
  send_results r;
  {
    std::lock_guard io(s.io_mutex);
    // The batch's replies belong to the thread running the batch: only its own
    // flush takes them (a posted or write-ready flush may run on another thread).
    if (batch_end && !s.batch_replies.empty()) {
      std::size_t first_unsent = 0;
      // Checked under io_mutex, as in enqueue(): fail() sets stopping_ before
      // it empties the send queue under io_mutex, so a reply made before the
      // shutdown does not go out after it.
      if (s.closed || stopping_.load(std::memory_order_relaxed)) {
        first_unsent = s.batch_replies.size();
        r.returned += static_cast<std::uint32_t>(first_unsent);
      } else if (s.send_queue.empty() && !s.write_wait) {
        // Nothing queued before them: straight from the batch's array.
        first_unsent = send_locked(s, s.batch_replies.data(), s.batch_replies.size(), r);
      }
      // Behind older sends, or the socket would block: they wait in the queue.
      try {
        for (std::size_t i = first_unsent; i < s.batch_replies.size(); ++i)
          s.send_queue.push_back(std::move(s.batch_replies[i]));
      } catch (const std::bad_alloc&) {
        // The queue could not grow: the replies not queued are dropped (UDP).
        for (auto& o : s.batch_replies) {
          if (o.buffer) {
            ++r.returned;
            send_errors_.fetch_add(1, std::memory_order_relaxed);
          }
        }
      }
      s.batch_replies.clear();  // the dropped ones give their buffers back here
    }
    if (!s.send_queue.empty()) {
      const std::size_t consumed = send_locked(s, s.send_queue.begin(), s.send_queue.size(), r);
      for (std::size_t i = 0; i < consumed; ++i) s.send_queue.pop_front();
    }
  }
  if (r.returned != 0) {
    {
      std::lock_guard lock(mutex_);
      if (!closed_) lent_buffers_ -= r.returned;
    }
    restart_if_needed(true);
  }
  for (auto& d : r.done) {
    asio::post(ctx_, asio::append(std::move(d.handler), d.ec));
  }
  if (r.socket_error) fail(r.socket_error, true);
}

}  // namespace detail
}  // namespace uipc::dispatch
