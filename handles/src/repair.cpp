// The daemon's repair of what a dead client process left in the segment: its
// transaction locks undone, the mutexes it owned abandoned, their waiters woken.
#include <unistd.h>

#include <algorithm>
#include <climits>

#include "segment.hpp"
#include "slot_state.hpp"

namespace uipc::handles::detail {

repair_result repair_dead_process(segment_view v, std::int32_t pid,
                                  std::span<const object_type> types) {
  repair_result out;
  const auto dead = static_cast<std::uint32_t>(pid);
  const auto daemon = static_cast<std::uint32_t>(::getpid());
  const std::uint32_t count =
      std::min<std::uint32_t>(v.capacity(), static_cast<std::uint32_t>(types.size()));
  for (std::uint32_t i = 0; i < count; ++i) {
    slot& s = v.at(i);
    const object_type type = types[i];  // the daemon's record, not the segment's
    if (type == object_type::none) continue;
    // One look, never a wait: a lock held by a live process (stopped, or one
    // writing garbage into the word) must not hold the daemon. A lock of the
    // dead process, or of another dead one, is undone: the value it stored
    // before locking is the value before the transaction.
    std::uint64_t st = s.state.load();
    for (;;) {
      const std::uint32_t locker = locker_of(st);
      if (locker == 0) break;
      if (locker != dead && locker != daemon && !process_is_gone(locker)) {
        // Only a mutex the dead process may own needs a look under that lock,
        // later. Any other slot holds nothing of the dead process: were it
        // retried, one lock that never goes (a client may write any word)
        // would keep every repair pending.
        if (type == object_type::mutex && s.owner_pid.load() == pid) out.incomplete = true;
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
