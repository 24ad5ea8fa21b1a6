// The shared-memory channel of one caps connection: two single-writer rings
// (client to server, server to client) and two payload arenas, in one memfd
// the server creates and passes at connect. Both sides map all of it writable,
// so each treats everything the other can write as untrusted: an index is
// read once and checked, an entry is copied out before it is looked at.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>

#include "uipc/core/futex.hpp"

namespace uipc::caps::detail {

inline constexpr std::uint64_t channel_magic = 0x7569706363617073;  // "uipccaps"
inline constexpr std::uint32_t channel_version = 1;
/// Entries per ring: room for a request, an abort and a dispose of every
/// message in flight at the largest limit.
inline constexpr std::uint32_t ring_entries = 512;
inline constexpr std::uint32_t max_in_flight_limit = ring_entries / 4;
/// Payload blocks start on this boundary.
inline constexpr std::size_t payload_alignment = 64;

enum class entry_kind : std::uint32_t {
  // client to server
  request = 1,  ///< id, offset and length in the request arena
  dispose = 2,  ///< the client is done with the reply to id
  abort = 3,    ///< the client withdraws id
  // server to client
  reply = 4,    ///< id, offset and length in the reply arena
  aborted = 5,  ///< id was withdrawn; no reply will come
  failed = 6,   ///< id was refused: status is the caps errc
};

struct entry {
  std::uint32_t kind;
  std::uint32_t status;
  std::uint64_t id;
  std::uint64_t offset;
  std::uint64_t length;
};

struct ring_shared {
  alignas(64) std::atomic<std::uint32_t> tail;  ///< written by the writer: entries published
  alignas(64) std::atomic<std::uint32_t> head;  ///< written by the reader: entries consumed
  alignas(64) entry entries[ring_entries];
};

struct channel_shared {
  /// 1 while the server polls this channel: a client that publishes then need
  /// not ring the doorbell. Written by the server only.
  alignas(64) std::atomic<std::uint32_t> server_watching;
  /// Client threads asleep on reply_seq. Written by the client only.
  alignas(64) std::atomic<std::uint32_t> client_sleepers;
  /// Nonzero while the client waits on its doorbell (an event loop). Client only.
  alignas(64) std::atomic<std::uint32_t> client_listening;
  /// Bumped by the server after it publishes to_client: the clients' futex word.
  alignas(64) std::atomic<std::uint32_t> reply_seq;
  /// Set by the server when it ends the connection (stop, a protocol
  /// violation), before it bumps reply_seq: sleeping clients wake and fail.
  alignas(64) std::atomic<std::uint32_t> server_closed;
  ring_shared to_server;
  ring_shared to_client;
};

/// Where the parts of a channel of these arena sizes lie.
struct channel_layout {
  std::size_t request_arena_offset;
  std::size_t request_arena_size;
  std::size_t reply_arena_offset;
  std::size_t reply_arena_size;
  std::size_t total;

  static channel_layout of(std::size_t request_arena, std::size_t reply_arena) noexcept {
    constexpr std::size_t page = 4096;
    const auto round = [](std::size_t n) { return (n + page - 1) / page * page; };
    channel_layout l{};
    l.request_arena_offset = round(sizeof(channel_shared));
    l.request_arena_size = round(request_arena);
    l.reply_arena_offset = l.request_arena_offset + l.request_arena_size;
    l.reply_arena_size = round(reply_arena);
    l.total = l.reply_arena_offset + l.reply_arena_size;
    return l;
  }
};

/// Whether [offset, offset + length) lies inside an arena of `size` bytes.
inline bool in_arena(std::uint64_t offset, std::uint64_t length, std::size_t size) noexcept {
  return offset <= size && length <= size - offset;
}

/// The writing end of a ring. The tail is ours (kept here, only stored to the
/// ring); the head is the peer's, read and checked only when the head last
/// read leaves too little room: the line the reader writes it to is not pulled
/// across on every put, which cost a cache miss per message.
class ring_writer {
 public:
  explicit ring_writer(ring_shared* r) noexcept : ring_(r) {}

  /// Free entries, at least `wanted` when there are: the count from the head
  /// last read, and when that is short, from the peer's head read again.
  /// Nothing when that head is impossible (ahead of our tail, or more than a
  /// ring behind it): the peer broke the protocol.
  std::optional<std::uint32_t> free_entries(std::uint32_t wanted = 1) noexcept {
    if (ring_entries - (tail_ - head_) >= wanted) return ring_entries - (tail_ - head_);
    const std::uint32_t head = ring_->head.load(std::memory_order_acquire);
    const std::uint32_t used = tail_ - head;
    // Also impossible: a head behind the one already read (the reader only advances).
    if (used > ring_entries || head - head_ > tail_ - head_) return std::nullopt;
    head_ = head;
    return ring_entries - used;
  }
  /// Writes one entry after the last; publish() makes the written ones visible.
  void put(const entry& e) noexcept {
    std::memcpy(&ring_->entries[tail_ % ring_entries], &e, sizeof e);
    ++tail_;
  }
  void publish() noexcept { ring_->tail.store(tail_, std::memory_order_release); }

 private:
  ring_shared* ring_;
  std::uint32_t tail_ = 0;
  std::uint32_t head_ = 0;  // the peer's head as last read and checked
};

/// The reading end of a ring: the head is ours, the tail the peer's.
class ring_reader {
 public:
  explicit ring_reader(ring_shared* r) noexcept : ring_(r) {}

  /// Entries waiting, or nothing when the peer's tail is impossible.
  std::optional<std::uint32_t> available() const noexcept {
    const std::uint32_t tail = ring_->tail.load(std::memory_order_acquire);
    const std::uint32_t waiting = tail - head_;
    if (waiting > ring_entries) return std::nullopt;
    return waiting;
  }
  /// Whether anything may be waiting: one relaxed load, for spinning.
  bool maybe_ready() const noexcept { return ring_->tail.load(std::memory_order_relaxed) != head_; }
  /// Copies the next entry out (call only within available()).
  entry take() noexcept {
    entry e;
    std::memcpy(&e, &ring_->entries[head_ % ring_entries], sizeof e);
    ++head_;
    return e;
  }
  /// Tells the writer the taken entries are free.
  void release() noexcept { ring_->head.store(head_, std::memory_order_release); }

 private:
  ring_shared* ring_;
  std::uint32_t head_ = 0;
};

}  // namespace uipc::caps::detail
