// The server's side of one client's channel: the ring it reads, the ring and
// arena it writes, and the messages of the client it has seen.
#pragma once

#include <atomic>
#include <boost/unordered/unordered_flat_map.hpp>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "channel.hpp"
#include "uipc/caps/service.hpp"
#include "uipc/core/range_allocator.hpp"
#include "uipc/core/shm.hpp"

namespace uipc::caps::detail {

struct server_channel : std::enable_shared_from_this<server_channel> {
  server_channel(std::shared_ptr<server_session> s, shm_segment seg, channel_layout layout,
                 std::uint32_t max_in_flight, unique_fd bell);

  client_id id() const noexcept { return session->id(); }

  /// Reads what the client published: events for the receiver, in order.
  /// False when the client broke the protocol (the channel is then unusable).
  bool drain(std::vector<event>& out);
  /// Whether the client may have published something (a relaxed load).
  bool maybe_ready() const noexcept { return from_client.maybe_ready(); }
  /// An event of this channel's client about `message`.
  event make_event(event_kind kind, message_id message = 0);
  /// Wakes the client's waiters after to_client was published.
  void wake_client() noexcept;

  std::shared_ptr<server_session> session;
  const void* owner = nullptr;  ///< the service::impl it belongs to (answers by event check it)
  shm_segment segment;
  channel_layout layout;
  channel_shared* shared;
  std::byte* request_arena;
  std::byte* reply_arena;
  std::uint32_t max_in_flight;
  /// Our end of the doorbells (bell.hpp): the client rings it when we do not
  /// watch; we ring it when the client listens on its loop.
  unique_fd bell;

  enum class message_state : std::uint8_t { delivered, replying, replied, withdrawn };
  struct message {
    message_state state;
    std::uint64_t reply_offset;
    bool has_block;
  };

  // Reading side: one drain at a time.
  std::mutex read_mutex;
  ring_reader from_client;
  std::atomic<bool> read_closed{
      false};  // written under read_mutex; the receiver also looks without it

  // Writing side and the message table.
  std::mutex state_mutex;
  ring_writer to_client;
  range_allocator reply_space;  // the reply arena: private books of a shared region
  using message_table = boost::unordered_flat_map<message_id, message>;
  message_table messages;      // open addressing: no malloc per message
  std::uint32_t awaiting = 0;  ///< messages not yet answered (delivered, replying, withdrawn)
  bool closed = false;

  // The receiver's own (under the service's pump lock).
  bool hot = false;
  std::uint32_t idle_sweeps = 0;

  /// Counts this channel among its service's live ones until it is destroyed:
  /// an ended client's channel lives on (its memfd mapped, its bell open)
  /// while events of it wait in the queue.
  struct census_entry {
    std::shared_ptr<std::atomic<std::size_t>> count;
    census_entry() = default;
    census_entry(const census_entry&) = delete;
    census_entry& operator=(const census_entry&) = delete;
    ~census_entry() {
      if (count) count->fetch_sub(1, std::memory_order_relaxed);
    }
  } counted;
};

}  // namespace uipc::caps::detail
