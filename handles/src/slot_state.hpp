// A slot's state word and futex word, as the operations in segment.cpp,
// slot_ops.cpp, slot_wait.cpp and repair.cpp share them (see segment.hpp for
// who may write which field).
#pragma once

#include <chrono>
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

/// How long a caller waits out another process's transaction lock on a slot:
/// until a time point; `lock_patience::min()` a moment (lock_try_patience:
/// every take, whose wait sleeps between tries instead), `lock_bounded`
/// lock_wait_limit from when the wait begins (the operations with no timeout:
/// signal, reset, release), `lock_patience::max()` for ever.
using lock_clock = std::chrono::steady_clock;
using lock_patience = lock_clock::time_point;
inline constexpr lock_patience lock_bounded{};
/// A lock is held for a few instructions; one held this long is a stopped
/// process's, or a word a client wrote: the operation fails with
/// errc::object_locked rather than wait on.
inline constexpr std::chrono::seconds lock_wait_limit{1};
/// A take's patience: far longer than a lock is held (a few instructions, or a
/// wait-all's compare-exchange per slot), far shorter than a sleep.
inline constexpr std::chrono::microseconds lock_try_patience{50};
/// Set when a take gave up on a lock (lock_patience::min()): the caller that
/// tried sleeps briefly, not on the futex word, which a lock's end does not
/// bump. The caller clears it before its tries.
extern constinit thread_local bool met_transaction_lock;

/// Waits out a transaction lock that stays (its holder is slow, stopped, dead
/// or hostile; see await_unlocked) until `until`. Returns the state, still
/// locked when it gave up.
std::uint64_t await_unlocked_slowly(std::atomic<std::uint64_t>& state,
                                    lock_patience until) noexcept;

/// Returns the slot's state once no transaction lock is held. Locks are held for
/// a few instructions, so one that stays is one whose holder died: the daemon
/// repairs it when the holder's socket closes, and whoever spins here (a peer,
/// or the daemon repairing another dead client) undoes it as soon as it sees
/// the holder gone. Restoring the value stored beside the lock is the undo:
/// a transaction writes its new value only when it unlocks. A live process can
/// write a lock word that stays too (any client may write the segment): a
/// caller with a deadline gets the locked state back at `until`, and takes
/// nothing.
inline std::uint64_t await_unlocked(std::atomic<std::uint64_t>& state,
                                    lock_patience until = lock_bounded) noexcept {
  const std::uint64_t s = state.load(std::memory_order_seq_cst);
  if (locker_of(s) == 0) return s;
  return await_unlocked_slowly(state, until);
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

/// Takes one unit of an event or a semaphore, if there is one: a manual event
/// stays signalled, an auto-reset event is reset, a semaphore's count goes
/// down by one. Inline: the single-object wait's whole take. Nothing is taken
/// when a transaction lock outlasts a take's patience (lock_patience::min()).
inline bool take_unit(slot& s, object_type type) noexcept {
  for (;;) {
    std::uint64_t st = await_unlocked(s.state, lock_patience::min());
    const std::uint32_t value = value_of(st);
    if (value == 0 || locker_of(st) != 0) return false;
    if (type == object_type::manual_event) return true;
    const std::uint32_t after = type == object_type::semaphore ? value - 1 : 0;
    if (s.state.compare_exchange_weak(st, make_state(0, after))) return true;
  }
}

/// Releases `count` units of semaphore `s`; sets `previous` to the count
/// before. errc{} (0) on success: codes in a register, the facade makes the
/// error_code. Inline: the facade's release is then one function.
inline errc release_semaphore(slot& s, std::uint32_t count, std::uint32_t& previous) noexcept {
  if (static_cast<object_type>(s.type.load(std::memory_order_acquire)) != object_type::semaphore) {
    return errc::wrong_type;
  }
  if (count == 0) return errc::invalid_argument;
  const std::uint32_t max = s.max_count.load(std::memory_order_relaxed);
  for (;;) {
    std::uint64_t st = await_unlocked(s.state);
    if (locker_of(st) != 0) return errc::object_locked;
    previous = value_of(st);
    if (count > max || previous > max - count) return errc::semaphore_limit;
    if (s.state.compare_exchange_weak(st, make_state(0, previous + count))) break;
  }
  notify(s, count > INT_MAX ? INT_MAX : static_cast<int>(count));
  return {};
}

/// take_now() for a mutex (slot_wait.cpp).
take_outcome take_mutex_now(const segment_view& v, slot& s) noexcept;

/// One unit of a single checked object if it is free now (a mutex taken goes
/// on this thread's record); busy when the caller has to wait for it, or for a
/// transaction lock that stays (wait() waits that out up to its deadline).
inline take_outcome take_now(const segment_view& v, slot& s, object_type type) noexcept {
  if (type == object_type::mutex) return take_mutex_now(v, s);
  return take_unit(s, type) ? take_outcome::signalled : take_outcome::busy;
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
