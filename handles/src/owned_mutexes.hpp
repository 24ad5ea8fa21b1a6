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

/// Records that the calling thread, `me` (= self()), owns mutex `index` of the
/// segment seen through `v` (mapped during the call). A mutex already recorded
/// is not added twice. Memory that cannot be pinned (not a shared mapping, or
/// 64 segments pinned already) is not recorded: such a mutex is abandoned only
/// with its process.
void note_mutex_owned(const segment_view& v, std::uint32_t index, self_id me) noexcept;

/// After the calling thread, `me`, released mutex `index` (`released`: its slot
/// as the caller's mapping shows it) for the last time: forgets it. When it
/// was recorded through another mapping (or the index is unknown_index),
/// forgets every recorded mutex the thread no longer owns instead.
void note_mutex_released(self_id me, const slot& released, std::uint32_t index) noexcept;

/// How many segments the process has pinned (tests: pins are let go).
std::size_t pinned_segments() noexcept;

}  // namespace uipc::handles::detail
