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
}  // namespace uipc::dispatch
