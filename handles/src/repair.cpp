// The daemon's repair of what a dead client process left in the segment: its
// transaction locks undone, the mutexes it owned abandoned, their waiters woken.
#include <unistd.h>

#include <algorithm>
#include <climits>

#include "segment.hpp"
#include "slot_state.hpp"

namespace uipc::handles::detail {

repair_result repair_dead_process(segment_view v, std::int32_t pid,
                                  std::span<const object_type> types, bool exited) {
  repair_result out;
  const auto dead = static_cast<std::uint32_t>(pid);
  const auto daemon = static_cast<std::uint32_t>(::getpid());
  // A process whose last session ended need not be gone: the session may have
  // been dropped (a protocol error, a silent peer), or the process is still
  // tearing down. Its locks are undone only once it has exited; before, one is
  // a live thread's transaction, and undoing it would make two owners.
  const bool dead_is_gone = exited || process_is_gone(dead);
  const std::uint32_t count =
      std::min<std::uint32_t>(v.capacity(), static_cast<std::uint32_t>(types.size()));
  for (std::uint32_t i = 0; i < count; ++i) {
    slot& s = v.at(i);
    const object_type type = types[i];  // the daemon's record, not the segment's
    if (type == object_type::none) continue;
    // One look, never a wait: a lock held by a live process (stopped, or one
    // writing garbage into the word) must not hold the daemon. A lock of a
    // process that is gone is undone: the value it stored before locking is
    // the value before the transaction. A lock of the daemon's own pid is never
    // the repair's (it locks and unlocks below, synchronously, under the
    // daemon's mutex): it is a thread of this process taking the slot through
    // a client of its own, and alive.
    std::uint64_t st = s.state.load();
    for (;;) {
      const std::uint32_t locker = locker_of(st);
      if (locker == 0) break;
      const bool gone = locker == dead ? dead_is_gone : locker != daemon && process_is_gone(locker);
      if (!gone) {
        // The process's own lock: it goes in a few instructions, or with the
        // process, and the slot is its business either way; look again later.
        // A mutex the dead process may own needs a look under another's lock,
        // later too. Any other slot holds nothing of the dead process: were it
        // retried, one lock that never goes (a client may write any word)
        // would keep every repair pending.
        if (locker == dead || (type == object_type::mutex && s.owner_pid.load() == pid))
          out.incomplete = true;
        break;
      }
      if (s.state.compare_exchange_strong(st, make_state(0, value_of(st)))) {
        st = make_state(0, value_of(st));
        notify(s, INT_MAX);
        break;
      }
    }
    if (type != object_type::mutex || locker_of(st) != 0) continue;
    for (int tries = 0; tries < 64; ++tries) {
      if (value_of(st) == 0 || s.owner_pid.load() != pid) break;
      if (!s.state.compare_exchange_strong(st, make_state(daemon, value_of(st)))) {
        if (locker_of(st) != 0) {  // someone else locked it meanwhile: later
          out.incomplete = true;
          break;
        }
        continue;
      }
      s.abandoned.store(1);
      s.recursion.store(0);
      s.owner_pid.store(0);
      s.state.store(make_state(0, 0));
      notify(s, INT_MAX);
      ++out.abandoned;
      break;
    }
  }
  return out;
}

}  // namespace uipc::handles::detail
