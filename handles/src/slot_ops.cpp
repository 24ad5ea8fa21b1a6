// Object operations that change one slot, run by clients in shared memory with no
// daemon round trip: signal and reset an event, release a semaphore or a mutex,
// abandon a mutex whose owner thread is gone. See segment.hpp for who may write
// which field, slot_wait.cpp for the takes.
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <climits>

#include "owned_mutexes.hpp"
#include "segment.hpp"
#include "slot_state.hpp"

namespace uipc::handles::detail {

error_code signal_event(slot& s) {
  const auto type = static_cast<object_type>(s.type.load(std::memory_order_acquire));
  if (type != object_type::manual_event && type != object_type::auto_event)
    return make_error_code(errc::wrong_type);
  for (;;) {
    std::uint64_t st = await_unlocked(s.state);
    if (locker_of(st) != 0) return make_error_code(errc::object_locked);
    if (value_of(st) != 0) return {};  // already signalled: nothing to wake
    if (s.state.compare_exchange_weak(st, make_state(0, 1))) break;
  }
  notify(s, type == object_type::manual_event ? INT_MAX : 1);
  return {};
}

error_code reset_event(slot& s) {
  const auto type = static_cast<object_type>(s.type.load(std::memory_order_acquire));
  if (type != object_type::manual_event && type != object_type::auto_event)
    return make_error_code(errc::wrong_type);
  for (;;) {
    std::uint64_t st = await_unlocked(s.state);
    if (locker_of(st) != 0) return make_error_code(errc::object_locked);
    if (value_of(st) == 0) return {};
    if (s.state.compare_exchange_weak(st, make_state(0, 0))) return {};
  }
}

error_code release_mutex(slot& s, const segment_view* v) {
  if (static_cast<object_type>(s.type.load(std::memory_order_acquire)) != object_type::mutex) {
    return make_error_code(errc::wrong_type);
  }
  const self_id me = self();
  const std::uint64_t now = await_unlocked(s.state);
  if (locker_of(now) != 0) return make_error_code(errc::object_locked);
  if (value_of(now) != me.tid) return make_error_code(errc::not_owner);
  // Only the owner writes the count while it owns the mutex.
  const std::uint32_t depth = s.recursion.load(std::memory_order_relaxed);
  if (depth > 1) {
    s.recursion.store(depth - 1, std::memory_order_relaxed);
    return {};
  }
  // owner_pid stays: it names the owner for the daemon's repair until the
  // value is 0, so a death at any step here still abandons (or has freed) the
  // mutex. A stale owner_pid beside value 0 means nothing, and the next owner
  // overwrites it under the lock before it commits its tid.
  s.recursion.store(0, std::memory_order_relaxed);  // ordered before the unlock by its CAS
  if (auto hook = release_step_hook) hook(1);
  for (;;) {
    std::uint64_t st = await_unlocked(s.state);
    // Re-read: a client may have written the word since the check above.
    if (locker_of(st) != 0 || value_of(st) != me.tid) {
      if (value_of(st) == me.tid) s.recursion.store(1, std::memory_order_relaxed);  // still ours
      return make_error_code(locker_of(st) != 0 ? errc::object_locked : errc::not_owner);
    }
    if (s.state.compare_exchange_weak(st, make_state(0, 0))) break;
  }
  if (auto hook = release_step_hook) hook(2);
  notify(s, 1);
  note_mutex_released(me, v, s);
  return {};
}

bool abandon_if_owned_by(slot& s, self_id owner) noexcept {
  if (static_cast<object_type>(s.type.load(std::memory_order_acquire)) != object_type::mutex)
    return false;
  for (;;) {
    std::uint64_t st = await_unlocked(s.state);
    if (locker_of(st) != 0) return false;  // the waiters' own look frees it later
    // The tid is the owner: no other live thread has it (one pid namespace), so
    // a value of our tid is a mutex of ours, whichever generation of the slot.
    if (value_of(st) != owner.tid) return false;
    if (!s.state.compare_exchange_weak(
            st, make_state(static_cast<std::uint32_t>(owner.pid), owner.tid)))
      continue;
    // Locked as the daemon's repair does it: a death of this process from here
    // on leaves the lock undone and the mutex abandoned by the daemon instead,
    // which is why owner_pid (ours) stays; beside value 0 it means nothing.
    s.abandoned.store(1);
    s.recursion.store(0);
    s.state.store(make_state(0, 0));
    notify(s, 1);
    return true;
  }
}

// A process that is gone is left to the daemon's repair, which counts it.
// tgkill(pid, tid, 0) asks about that very thread of that very process; the
// pair is re-read under the slot's lock before anything changes.
bool abandon_if_owner_vanished(slot& s) noexcept {
  const std::uint64_t st = s.state.load(std::memory_order_seq_cst);
  const std::uint32_t tid = value_of(st);
  const std::int32_t pid = s.owner_pid.load();
  if (tid == 0 || locker_of(st) != 0 || pid <= 0) return false;
  if (::syscall(SYS_tgkill, pid, static_cast<pid_t>(tid), 0) == 0 || errno != ESRCH) return false;
  if (!process_alive(pid)) return false;
  std::uint64_t expected = st;
  if (!s.state.compare_exchange_strong(expected,
                                       make_state(static_cast<std::uint32_t>(self().pid), tid)))
    return false;
  if (s.owner_pid.load() != pid) {  // another owner took and released it meanwhile
    s.state.store(st);
    return false;
  }
  // owner_pid stays until the commit: a death of ours before it leaves our
  // lock undone and the pair (tid, pid) for the next waiter to find again.
  s.abandoned.store(1);
  s.recursion.store(0);
  s.state.store(make_state(0, 0));
  notify(s, 1);
  return true;
}

}  // namespace uipc::handles::detail
