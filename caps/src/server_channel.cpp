#include "server_channel.hpp"

#include <unistd.h>

#include <climits>

#include "bell.hpp"

namespace uipc::caps::detail {

server_channel::server_channel(std::shared_ptr<server_session> s, shm_segment seg, channel_layout l,
                               std::uint32_t max, unique_fd b)
    : session(std::move(s)),
      segment(std::move(seg)),
      layout(l),
      shared(new (segment.data()) channel_shared{}),
      request_arena(static_cast<std::byte*>(segment.data()) + l.request_arena_offset),
      reply_arena(static_cast<std::byte*>(segment.data()) + l.reply_arena_offset),
      max_in_flight(max),
      bell(std::move(b)),
      from_client(&shared->to_server),
      to_client(&shared->to_client),
      reply_space(l.reply_arena_size, payload_alignment) {}

event server_channel::make_event(event_kind kind, message_id message) {
  event ev;
  ev.kind = kind;
  ev.channel_ = shared_from_this();
  ev.client = id();
  ev.id = message;
  return ev;
}

bool server_channel::drain(std::vector<event>& out) {
  if (!from_client.maybe_ready()) return true;
  std::lock_guard lock(state_mutex);
  // At most a ring's worth: a client that keeps writing does not keep us here.
  for (std::uint32_t i = 0; i < ring_entries; ++i) {
    const auto next = from_client.take();  // a copy: the client may rewrite the slot meanwhile
    if (!next) break;
    const entry& e = *next;
    switch (static_cast<entry_kind>(e.kind)) {
      case entry_kind::request: {
        if (!in_arena(e.offset, e.length, layout.request_arena_size)) return false;
        if (awaiting >= max_in_flight) return false;
        if (!messages.try_emplace(e.id, message{message_state::delivered, 0, false}).second)
          return false;
        ++awaiting;
        event& ev = out.emplace_back(make_event(event_kind::request, e.id));
        ev.data_ = request_arena + e.offset;
        ev.length_ = static_cast<std::size_t>(e.length);
        break;
      }
      case entry_kind::dispose: {
        const auto m = messages.find(e.id);
        if (m == messages.end() || m->second.state != message_state::replied) return false;
        if (m->second.has_block) reply_space.free(m->second.reply_offset);
        messages.erase(m);
        out.push_back(make_event(event_kind::dispose, e.id));
        break;
      }
      case entry_kind::abort: {
        // An abort that crossed our reply (or our refusal) changes nothing.
        const auto m = messages.find(e.id);
        if (m == messages.end()) break;
        if (m->second.state == message_state::delivered ||
            m->second.state == message_state::replying) {
          m->second.state = message_state::withdrawn;
          event ev;
          ev.kind = event_kind::withdrawn;
          ev.channel_ = shared_from_this();
          ev.client = id();
          ev.id = e.id;
          out.push_back(std::move(ev));
        }
        break;
      }
      default:
        return false;
    }
  }
  from_client.release();
  return true;
}

void server_channel::wake_client() noexcept {
  shared->reply_seq.fetch_add(1, std::memory_order_seq_cst);
  if (shared->client_sleepers.load(std::memory_order_seq_cst) != 0)
    futex::wake(shared->reply_seq, INT_MAX);
  if (shared->client_listening.load(std::memory_order_seq_cst) != 0) ring_bell(bell.get());
}

}  // namespace uipc::caps::detail
