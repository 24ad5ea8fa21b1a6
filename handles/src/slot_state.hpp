// A slot's state word and futex word, as the operations in segment.cpp,
// slot_ops.cpp, slot_wait.cpp and repair.cpp share them (see segment.hpp for
// who may write which field).
#pragma once

#include <climits>
#include <cstdint>

#include "segment.hpp"
#include "uipc/core/futex.hpp"

namespace uipc::handles::detail {

/// The state word: the transaction lock's holder (a pid, 0: unlocked) above the value.
constexpr std::uint64_t make_state(std::uint32_t locker, std::uint32_t value) noexcept {
  return (static_cast<std::uint64_t>(locker) << 32) | value;
}
constexpr std::uint32_t value_of(std::uint64_t s) noexcept { return static_cast<std::uint32_t>(s); }
constexpr std::uint32_t locker_of(std::uint64_t s) noexcept {
  return static_cast<std::uint32_t>(s >> 32);
}

/// Waits out a transaction lock that stays (its holder is slow or dead; see
/// await_unlocked).
std::uint64_t await_unlocked_slowly(std::atomic<std::uint64_t>& state) noexcept;

/// Returns the slot's state once no transaction lock is held. Locks are held for
/// a few instructions, so one that stays is one whose holder died: the daemon
/// repairs it when the holder's socket closes, and whoever spins here (a peer,
/// or the daemon repairing another dead client) undoes it as soon as it sees
/// the holder gone. Restoring the value stored beside the lock is the undo:
/// a transaction writes its new value only when it unlocks.
inline std::uint64_t await_unlocked(std::atomic<std::uint64_t>& state) noexcept {
  const std::uint64_t s = state.load(std::memory_order_seq_cst);
  if (locker_of(s) == 0) return s;
  return await_unlocked_slowly(state);
}

/// After a change that may satisfy waiters (a seq_cst store or read-modify-write
/// of the state, which every caller makes): bumps the futex word and wakes, only
/// if someone sleeps or is about to. A sleeper (wait() in slot_wait.cpp, an async
/// wait) registers in `waiters` before it reads seq and retries, all seq_cst: if
/// this load finds no sleeper, the registration comes later in the single total
/// order, and so does the retry, which sees the change; if it finds one, the
/// bump makes its futex sleep return or the wake ends it. So an uncontended
/// release or signal costs one atomic read-modify-write (the state's), not two.
/// A wake-one may pick a sleeper that waits on several objects and then takes
/// nothing (a wait-all missing another object) or another object (a wait-any):
/// the wake would be lost to a single-object sleeper, who would sleep on to the
/// end of its slice. So while a multi-object sleeper is registered, every
/// sleeper is woken.
inline void notify(slot& s, int count) noexcept {
  if (s.waiters.load(std::memory_order_seq_cst) == 0) return;
  s.seq.fetch_add(1, std::memory_order_seq_cst);
  if (s.multi_waiters.load(std::memory_order_seq_cst) != 0) count = INT_MAX;
  futex::wake(s.seq, count);
}

/// Zombies count as gone: a killed client stays one until its parent reaps it,
/// and the daemon must not wait on that.
inline bool process_is_gone(std::uint32_t pid) {
  return !process_alive(static_cast<std::int32_t>(pid));
}

/// Abandons mutex `s` if its owning thread is gone while its process lives on (a
/// thread that ended without its thread_local destructors, which would have
/// abandoned it; see owned_mutexes.hpp). For a waiter that slept a slice on it.
/// Returns whether it did.
bool abandon_if_owner_vanished(slot& s) noexcept;

}  // namespace uipc::handles::detail
