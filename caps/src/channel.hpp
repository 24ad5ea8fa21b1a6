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
/// 2: entries carry their sequence, no tail; 3: one doorbell socket pair (bell.hpp)
inline constexpr std::uint32_t channel_version = 3;
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

/// One entry as the rings' users see it. In the ring, the first word holds the
/// kind in its low 8 bits and the entry's sequence (its position + 1, modulo
/// 2^24) above them, written last: a reader waiting for an entry watches the
/// entry itself, and one cache line brings both the news and the entry.
struct entry {
  std::uint32_t kind;
  std::uint32_t status;
  std::uint64_t id;
  std::uint64_t offset;
  std::uint64_t length;
};

inline constexpr std::uint32_t entry_kind_bits = 8;
inline constexpr std::uint32_t entry_kind_mask = (1u << entry_kind_bits) - 1;

/// The first word of the entry at `position` once it is written.
constexpr std::uint32_t stamped_kind(std::uint32_t position, std::uint32_t kind) noexcept {
  return (position + 1) << entry_kind_bits | (kind & entry_kind_mask);
}

struct ring_shared {
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

/// The writing end of a ring. The position is ours; the head is the peer's,
/// read and checked only when the head last read leaves too little room: the
/// line the reader writes it to is not pulled across on every put.
class ring_writer {
 public:
  explicit ring_writer(ring_shared* r) noexcept : ring_(r) {}

  /// Free entries, at least `wanted` when there are: the count from the head
  /// last read, and when that is short, from the peer's head read again.
  /// Nothing when that head is impossible (ahead of our position, more than a
  /// ring behind it, or behind the head read before): the peer broke the
  /// protocol.
  std::optional<std::uint32_t> free_entries(std::uint32_t wanted = 1) noexcept {
    if (ring_entries - (next_ - head_) >= wanted) return ring_entries - (next_ - head_);
    const std::uint32_t head = ring_->head.load(std::memory_order_acquire);
    const std::uint32_t used = next_ - head;
    if (used > ring_entries || head - head_ > next_ - head_) return std::nullopt;
    head_ = head;
    return ring_entries - used;
  }
  /// Writes one entry after the last (call only within free_entries()); the
  /// reader may take it at once.
  void put(const entry& e) noexcept {
    entry& slot = ring_->entries[next_ % ring_entries];
    std::memcpy(reinterpret_cast<char*>(&slot) + sizeof e.kind,
                reinterpret_cast<const char*>(&e) + sizeof e.kind, sizeof e - sizeof e.kind);
    std::atomic_ref(slot.kind).store(stamped_kind(next_, e.kind), std::memory_order_release);
    ++next_;
  }

 private:
  ring_shared* ring_;
  std::uint32_t next_ = 0;  // the position of the next put
  std::uint32_t head_ = 0;  // the peer's head as last read and checked
};

/// The reading end of a ring: the head is ours (kept here: the one in the ring
/// is the peer's to scribble on), the entries the peer's, each taken once its
/// first word says it is the next one.
class ring_reader {
 public:
  explicit ring_reader(ring_shared* r) noexcept : ring_(r) {}

  /// Whether the next entry may be there: one relaxed look at it, for
  /// spinning and for the sleep handshakes; may be asked from any thread.
  bool maybe_ready() const noexcept {
    const std::uint32_t head = head_.load(std::memory_order_relaxed);
    const auto word =
        std::atomic_ref(ring_->entries[head % ring_entries].kind).load(std::memory_order_relaxed);
    return word == stamped_kind(head, word);
  }
  /// Copies the next entry out, if the writer wrote it (an entry of any
  /// other sequence is not written yet, or garbage: either way not taken).
  /// One taker at a time.
  std::optional<entry> take() noexcept {
    const std::uint32_t head = head_.load(std::memory_order_relaxed);
    entry& slot = ring_->entries[head % ring_entries];
    const std::uint32_t word = std::atomic_ref(slot.kind).load(std::memory_order_acquire);
    if (word != stamped_kind(head, word)) return std::nullopt;
    entry e;
    std::memcpy(&e, &slot, sizeof e);  // a copy: the writer may rewrite the slot meanwhile
    e.kind = word & entry_kind_mask;
    head_.store(head + 1, std::memory_order_relaxed);
    return e;
  }
  /// Tells the writer the taken entries are free.
  void release() noexcept {
    ring_->head.store(head_.load(std::memory_order_relaxed), std::memory_order_release);
  }

 private:
  ring_shared* ring_;
  std::atomic<std::uint32_t> head_{0};  // atomic: maybe_ready() looks from other threads
};

}  // namespace uipc::caps::detail
