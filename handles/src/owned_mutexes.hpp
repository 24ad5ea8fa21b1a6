// The mutexes each thread owns, so that a thread which exits holding some
// abandons them (Win32 semantics: the next owner is told, a waiter wakes).
//
// Each thread keeps a list of the mutexes it took (filled on acquire, pruned on
// its final releases); its thread_local destructor abandons those it still owns.
// The client's mapping of the segment may be gone by then (the client destroyed
// before the thread exits), so the list never points into it: it points into a
// mapping of its own of the same pages (a "pin": mremap of the shared mapping
// with old size 0, header and table only), shared by the process's threads per
// segment and unmapped when the last thread holding it lets go. A thread lets go
// of a pin at its exit, and earlier once it owns nothing there and that segment's
// daemon has stopped or died, or it holds too many.
//
// A thread that vanishes without running its destructors (a raw SYS_exit) is
// caught by the waiters instead: a wait that sleeps a whole slice on a mutex
// asks whether the owning thread still lives (see segment.cpp). Process death
// stays the daemon's repair.
#pragma once

#include <cstddef>
#include <cstdint>

#include "segment.hpp"

namespace uipc::handles::detail {

/// This process's own mapping of one segment's header and table (a pin).
/// Written under the pin table's lock only; a thread holding a reference reads
/// the fixed fields without it (they do not change while refs > 0).
struct pin {
  std::byte* base = nullptr;
  std::size_t length = 0;
  slot* slots = nullptr;
  segment_header* header = nullptr;
  std::uint32_t slot_count = 0;
  std::uint64_t epoch = 0;  ///< the daemon's random epoch names the segment
  std::uint32_t refs = 0;   ///< thread records holding this pin
};

/// The thread's hot entry: the one mutex it owns when it owns one (most
/// threads own one at a time), recorded without the vectors of its record,
/// and the view the record last pinned, so that a take and its release cost a
/// few loads and stores here, inline. A recorded mutex is named by its
/// segment's epoch and its index, never by an address a mapping shows it at
/// (another segment may be mapped there later). Trivially destructible: the
/// record's destructor (which every thread that filled this has: only the
/// record sets the view) reads it at the thread's exit. Written by
/// owned_mutexes.cpp and the inline paths below, by its own thread only.
struct hot_entry {
  pin* where = nullptr;  ///< the hot mutex's pin; null: none
  std::uint32_t index = 0;
  std::uint32_t cold_count = 0;  ///< entries in the record's vector: the hot path needs none
  /// The process whose record filled this (a fork copies it); -1 once the
  /// thread's record is destroyed (a later thread_local destructor that
  /// takes or releases a mutex records nothing).
  std::int32_t pid = 0;
  /// The record holds several views: a release may let go of another's pin,
  /// which is the record's business.
  bool many_views = false;
  std::uint32_t view_slots = 0;                 ///< slots of the view's pin
  const segment_header* view_header = nullptr;  ///< the view the record last pinned
  std::uint64_t view_epoch = 0;
  pin* view_pin = nullptr;  ///< null: none, or not pinnable
};
extern constinit thread_local hot_entry hot;

/// The record's paths (owned_mutexes.cpp), when the hot entry cannot serve.
void record_owned(const segment_view& v, std::uint32_t index, self_id me) noexcept;
void record_released(self_id me, const segment_view* v, const slot& released) noexcept;

/// Records that the calling thread, `me` (= self()), owns mutex `index` of the
/// segment seen through `v` (mapped during the call). A mutex already recorded
/// is not added twice. Memory that cannot be pinned (not a shared mapping, or
/// 64 segments pinned already) is not recorded: such a mutex is abandoned only
/// with its process.
inline void note_mutex_owned(const segment_view& v, std::uint32_t index, self_id me) noexcept {
  hot_entry& h = hot;
  if (h.view_header == v.header && h.view_pin != nullptr && h.where == nullptr &&
      h.cold_count == 0 && h.pid == me.pid && index < h.view_slots && h.view_epoch == v.epoch)
      [[likely]] {
    h.where = h.view_pin;
    h.index = index;
    return;
  }
  record_owned(v, index, me);
}

/// After the calling thread, `me`, released mutex `released` of the segment
/// seen through `v` for the last time: forgets it. Without `v` (null), forgets
/// every recorded mutex the thread no longer owns instead.
inline void note_mutex_released(self_id me, const segment_view* v, const slot& released) noexcept {
  hot_entry& h = hot;
  if (v != nullptr && h.where != nullptr && !h.many_views && h.pid == me.pid) [[likely]] {
    const auto index = static_cast<std::uint32_t>(&released - v->slots);
    if (h.index == index && h.where->epoch == v->epoch) {
      h.where = nullptr;
      return;
    }
  }
  record_released(me, v, released);
}

/// How many segments the process has pinned (tests: pins are let go).
std::size_t pinned_segments() noexcept;

}  // namespace uipc::handles::detail
