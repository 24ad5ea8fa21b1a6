// Operations on the handle segment: object state transitions, futex waits, and
// the daemon's repairs. See segment.hpp for who may write which field.
#include "segment.hpp"

#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <climits>
#include <cstring>
#include <new>
#include <optional>

#include "owned_mutexes.hpp"

namespace uipc::handles::detail {

namespace {

using steady = std::chrono::steady_clock;

constexpr std::uint64_t make_state(std::uint32_t locker, std::uint32_t value) noexcept {
  return (static_cast<std::uint64_t>(locker) << 32) | value;
}
constexpr std::uint32_t value_of(std::uint64_t s) noexcept { return static_cast<std::uint32_t>(s); }
constexpr std::uint32_t locker_of(std::uint64_t s) noexcept {
  return static_cast<std::uint32_t>(s >> 32);
}

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// FUTEX_WAIT / FUTEX_WAKE deliberately without FUTEX_PRIVATE_FLAG: the word is
// in a MAP_SHARED mapping and waiter and waker are different processes.
long futex_wait(std::atomic<std::uint32_t>* word, std::uint32_t expected,
                const timespec* relative) {
  return ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), FUTEX_WAIT, expected,
                   relative, nullptr, 0);
}
void futex_wake(std::atomic<std::uint32_t>* word, int count) {
  ::syscall(SYS_futex, reinterpret_cast<std::uint32_t*>(word), FUTEX_WAKE, count, nullptr, nullptr,
            0);
}
long sys_futex_waitv(struct futex_waitv* waiters, unsigned count,
                     const timespec* absolute_monotonic) {
  return ::syscall(SYS_futex_waitv, waiters, count, 0, absolute_monotonic, CLOCK_MONOTONIC);
}

timespec to_timespec(std::chrono::nanoseconds d) {
  if (d.count() < 0) d = std::chrono::nanoseconds(0);
  timespec ts{};
  ts.tv_sec = static_cast<time_t>(d.count() / 1'000'000'000);
  ts.tv_nsec = static_cast<long>(d.count() % 1'000'000'000);
  return ts;
}

// Zombies count as gone: a killed client stays one until its parent reaps it,
// and the daemon must not wait on that.
bool process_is_gone(std::uint32_t pid) { return !process_alive(static_cast<std::int32_t>(pid)); }

// Returns the slot's state once no transaction lock is held. Locks are held for
// a few instructions, so a lock that stays is one whose holder died: the daemon
// repairs it when the holder's socket closes, and whoever spins here (a peer,
// or the daemon repairing another dead client) undoes it as soon as it sees
// the holder gone. Restoring the value stored beside the lock is the undo:
// a transaction writes its new value only when it unlocks.
std::uint64_t await_unlocked(std::atomic<std::uint64_t>& state) noexcept {
  for (unsigned spins = 0;; ++spins) {
    std::uint64_t s = state.load(std::memory_order_seq_cst);
    if (locker_of(s) == 0) return s;
    if (spins < 256) {
      cpu_relax();
      continue;
    }
    ::sched_yield();
    if (spins % 1024 == 0 && process_is_gone(locker_of(s))) {
      state.compare_exchange_strong(s, make_state(0, value_of(s)));
    }
    if (spins > 4096) {
      timespec pause{0, 200'000};
      ::nanosleep(&pause, nullptr);
    }
  }
}

// After a change that may satisfy waiters: bump the futex word and wake only if
// someone sleeps (see wait() for why the seq_cst order makes this safe).
// A wake-one may pick a sleeper that waits on several objects and then takes
// nothing (a wait-all missing another object) or another object (a wait-any):
// the wake would be lost to a single-object sleeper, who would sleep on to the
// end of its slice. So while a multi-object sleeper is registered, wake all.
void notify(slot& s, int count) noexcept {
  s.seq.fetch_add(1, std::memory_order_seq_cst);
  if (s.waiters.load(std::memory_order_seq_cst) != 0) {
    if (s.multi_waiters.load(std::memory_order_seq_cst) != 0) count = INT_MAX;
    futex_wake(&s.seq, count);
  }
}

// futex_waitv needs Linux 5.16 (and a seccomp filter may refuse it): the first
// failure other than a wake, a timeout or a changed word switches every later
// multi-object wait to sliced single-futex sleeps.
std::atomic<bool> waitv_unusable{false};

// pid and tid cached per thread; a fork gives the child a new identity.
std::atomic<std::uint32_t> fork_generation{0};
struct cached_self {
  std::uint32_t generation = UINT32_MAX;
  self_id id{};
};
thread_local cached_self this_thread;

// Takes one unit of a single object. Sets `abandoned` for a mutex whose last
// owner died.
bool try_take(slot& s, object_type type, const self_id& me, bool& abandoned) noexcept {
  switch (type) {
    case object_type::manual_event:
      return value_of(await_unlocked(s.state)) != 0;
    case object_type::auto_event:
      for (;;) {
        std::uint64_t st = await_unlocked(s.state);
        if (value_of(st) == 0) return false;
        if (s.state.compare_exchange_weak(st, make_state(0, 0))) return true;
      }
    case object_type::semaphore:
      for (;;) {
        std::uint64_t st = await_unlocked(s.state);
        const std::uint32_t count = value_of(st);
        if (count == 0) return false;
        if (s.state.compare_exchange_weak(st, make_state(0, count - 1))) return true;
      }
    case object_type::mutex:
      for (;;) {
        std::uint64_t st = await_unlocked(s.state);
        const std::uint32_t owner = value_of(st);
        if (owner == me.tid) {  // recursion: only the owner touches the count
          s.recursion.fetch_add(1);
          return true;
        }
        if (owner != 0) return false;
        if (!s.state.compare_exchange_weak(st, make_state(static_cast<std::uint32_t>(me.pid), 0)))
          continue;
        abandoned = s.abandoned.exchange(0) != 0;
        s.owner_pid.store(me.pid);
        s.recursion.store(1);
        s.state.store(make_state(0, me.tid));
        return true;
      }
    case object_type::none:
      break;
  }
  return false;
}

bool available(object_type type, std::uint32_t value, const self_id& me) noexcept {
  switch (type) {
    case object_type::manual_event:
    case object_type::auto_event:
    case object_type::semaphore:
      return value != 0;
    case object_type::mutex:
      return value == 0 || value == me.tid;
    case object_type::none:
      break;
  }
  return false;
}

// Wait-all: locks every slot (in the caller's index order, so two wait-alls never
// deadlock), takes all of them only if all are available, and unlocks. Nothing
// is consumed, and no other process sees a partial take, unless all can be taken.
std::optional<wait_result> try_take_all(std::span<const wait_target> targets,
                                        const self_id& me) noexcept {
  std::array<std::uint32_t, max_wait_objects> before{};
  const auto locker = static_cast<std::uint32_t>(me.pid);
  for (std::size_t i = 0; i < targets.size(); ++i) {
    auto& st = targets[i].s->state;
    for (;;) {
      std::uint64_t s = await_unlocked(st);
      if (st.compare_exchange_weak(s, make_state(locker, value_of(s)))) {
        before[i] = value_of(s);
        break;
      }
    }
  }
  bool all = true;
  for (std::size_t i = 0; i < targets.size() && all; ++i)
    all = available(targets[i].type, before[i], me);
  if (!all) {
    for (std::size_t i = 0; i < targets.size(); ++i)
      targets[i].s->state.store(make_state(0, before[i]));
    return std::nullopt;
  }
  // The commit unlocks slot by slot. A process killed between its first and its
  // last store has taken the slots it unlocked and nothing else: the rest are
  // still locked with their old values, which the repair restores. No live
  // process can tell that apart from a state it may see anyway: the dead
  // process could have taken those same slots one by one (wait_any, single
  // waits) and died, and a death right after a whole wait-all leaves every
  // unit taken just the same: semaphore units gone, auto-reset events reset,
  // mutexes owned by a dead thread and so abandoned to their next owner. What
  // wait-all promises is that a *living* waiter never holds part of its set
  // while it waits (no deadlock, no starvation of others by a partial take);
  // a dead one holds nothing, and live processes never see the locked slots'
  // values until the repair has put them back. So nothing needs undoing.
  wait_result r{wait_status::signalled, 0};
  for (std::size_t i = 0; i < targets.size(); ++i) {
    slot& s = *targets[i].s;
    std::uint32_t after = before[i];
    switch (targets[i].type) {
      case object_type::auto_event:
        after = 0;
        break;
      case object_type::semaphore:
        after = before[i] - 1;
        break;
      case object_type::mutex:
        if (before[i] == me.tid) {
          s.recursion.fetch_add(1);
        } else {
          if (s.abandoned.exchange(0) != 0 && r.status != wait_status::abandoned)
            r = {wait_status::abandoned, i};
          s.owner_pid.store(me.pid);
          s.recursion.store(1);
          after = me.tid;
        }
        break;
      default:
        break;
    }
    s.state.store(make_state(0, after));
  }
  return r;
}

// The calling thread's adaptive spin budget (see wait()).
struct spin_state {
  std::int64_t budget_ns = -1;  // -1: not yet adapted, use the configured spin
  std::uint32_t waits_without_spin = 0;
};
thread_local spin_state this_thread_spin;

constexpr std::int64_t probe_spin_ns = 4'000;
constexpr std::int64_t smallest_spin_ns = 500;

std::chrono::nanoseconds spin_budget(std::chrono::nanoseconds configured) {
  auto& st = this_thread_spin;
  const std::int64_t max = configured.count();
  if (max <= 0) return std::chrono::nanoseconds(0);
  if (st.budget_ns < 0 || st.budget_ns > max) st.budget_ns = max;
  if (st.budget_ns > 0) return std::chrono::nanoseconds(st.budget_ns);
  if (++st.waits_without_spin % 256 == 0)
    return std::chrono::nanoseconds(std::min(max, probe_spin_ns));
  return std::chrono::nanoseconds(0);
}

void spin_paid(std::chrono::nanoseconds configured, bool paid) {
  auto& st = this_thread_spin;
  const std::int64_t max = configured.count();
  if (paid) {
    st.budget_ns = std::min(max, std::max<std::int64_t>(st.budget_ns * 2, smallest_spin_ns * 2));
  } else {
    st.budget_ns /= 2;
    if (st.budget_ns < smallest_spin_ns) st.budget_ns = 0;
  }
}

// A slot closed under a waiter is reported, never taken under its new identity.
bool still_valid(const wait_target& t) noexcept {
  return t.s->generation.load(std::memory_order_acquire) == t.generation &&
         t.s->type.load(std::memory_order_acquire) == static_cast<std::uint32_t>(t.type);
}

std::uint32_t index_in(const segment_view& v, const wait_target& t) noexcept {
  return static_cast<std::uint32_t>(t.s - v.slots);
}

// The calling thread's yield-before-sleep state (see wait()). A yield that is
// followed by a sleep anyway costs a system call, and on a busy CPU a whole time
// slice of someone else's; so after one that did not pay the thread skips the
// yield for 1, 2, 4, ... up to 256 waits, and yields every time again once one pays.
struct yield_state {
  std::uint32_t skip = 0;       // waits left to skip
  std::uint32_t next_skip = 0;  // how many to skip after the next failure
};
thread_local yield_state this_thread_yield;

bool yield_due() noexcept {
  auto& st = this_thread_yield;
  if (st.skip == 0) return true;
  --st.skip;
  return false;
}

void yield_paid(bool paid) noexcept {
  auto& st = this_thread_yield;
  if (paid) {
    st.next_skip = 0;
    return;
  }
  st.next_skip = std::min<std::uint32_t>(256, st.next_skip == 0 ? 1 : st.next_skip * 2);
  st.skip = st.next_skip;
}

// How long a sleep lasts before a look at the daemon (set_sleep_slice).
std::atomic<std::int64_t> sleep_slice_ns{1'000'000'000};

// A mutex whose owning thread is gone while its process lives on, a thread that
// ended without its thread_local destructors (which would have abandoned it;
// see owned_mutexes.hpp): abandoned by a waiter that slept a slice on it. A
// process that is gone is left to the daemon's repair, which counts it.
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

}  // namespace

std::size_t segment_bytes(std::uint32_t capacity, std::size_t scratch_size) {
  return sizeof(segment_header) + static_cast<std::size_t>(capacity) * sizeof(slot) +
         ((scratch_size + 63) & ~63ULL);
}

segment_view format_segment(void* data, std::size_t size, std::uint32_t capacity,
                            std::size_t scratch_size, std::uint64_t epoch) {
  (void)size;
  auto* base = static_cast<std::byte*>(data);
  auto* h = new (base) segment_header{};
  h->capacity = capacity;
  h->slot_size = sizeof(slot);
  h->table_offset = sizeof(segment_header);
  h->scratch_offset = sizeof(segment_header) + static_cast<std::uint64_t>(capacity) * sizeof(slot);
  h->scratch_size = scratch_size;
  auto* slots = reinterpret_cast<slot*>(base + h->table_offset);
  for (std::uint32_t i = 0; i < capacity; ++i) new (&slots[i]) slot{};
  h->daemon_pid.store(static_cast<std::int32_t>(::getpid()));
  h->epoch.store(epoch);
  h->state.store(static_cast<std::uint32_t>(daemon_state::starting), std::memory_order_release);
  return {h, slots, base + h->scratch_offset, capacity, scratch_size};
}

result<segment_view> attach_segment(void* data, std::size_t size, std::uint32_t capacity,
                                    std::uint64_t scratch_size) {
  auto* base = static_cast<std::byte*>(data);
  if (size < sizeof(segment_header) || capacity == 0)
    return make_error_code(uipc::errc::bad_segment);
  auto* h = reinterpret_cast<segment_header*>(base);
  // Our own numbers decide the layout; the header must agree, and the mapping
  // must hold it.
  const std::uint64_t table = sizeof(segment_header);
  const std::uint64_t scratch_at = table + static_cast<std::uint64_t>(capacity) * sizeof(slot);
  if (h->slot_size != sizeof(slot) || h->table_offset != table || h->capacity != capacity ||
      h->scratch_offset != scratch_at || h->scratch_size != scratch_size || scratch_size > size ||
      scratch_at > size - scratch_size) {
    return make_error_code(uipc::errc::bad_segment);
  }
  return segment_view{h, reinterpret_cast<slot*>(base + table), base + scratch_at, capacity,
                      scratch_size};
}

self_id self() noexcept {
  static const bool registered = [] {
    ::pthread_atfork(nullptr, nullptr, [] { fork_generation.fetch_add(1); });
    return true;
  }();
  (void)registered;
  const std::uint32_t gen = fork_generation.load(std::memory_order_relaxed);
  if (this_thread.generation != gen) {
    this_thread.id = {static_cast<std::int32_t>(::getpid()),
                      static_cast<std::uint32_t>(::gettid())};
    this_thread.generation = gen;
  }
  return this_thread.id;
}

result<slot*> checked_slot(segment_view v, handle_id h, object_type expected) {
  if (h.index >= v.capacity() || h.generation == 0) return make_error_code(errc::invalid_handle);
  slot& s = v.at(h.index);
  const auto type = static_cast<object_type>(s.type.load(std::memory_order_acquire));
  if (s.generation.load(std::memory_order_acquire) != h.generation || type == object_type::none) {
    return make_error_code(errc::stale_handle);
  }
  if (expected != object_type::none && type != expected) return make_error_code(errc::wrong_type);
  return &s;
}

error_code signal_event(slot& s) {
  const auto type = static_cast<object_type>(s.type.load(std::memory_order_acquire));
  if (type != object_type::manual_event && type != object_type::auto_event)
    return make_error_code(errc::wrong_type);
  for (;;) {
    std::uint64_t st = await_unlocked(s.state);
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
    if (value_of(st) == 0) return {};
    if (s.state.compare_exchange_weak(st, make_state(0, 0))) return {};
  }
}

result<std::uint32_t> release_semaphore(slot& s, std::uint32_t count) {
  if (static_cast<object_type>(s.type.load(std::memory_order_acquire)) != object_type::semaphore) {
    return make_error_code(errc::wrong_type);
  }
  if (count == 0) return make_error_code(errc::invalid_argument);
  const std::uint32_t max = s.max_count.load(std::memory_order_relaxed);
  std::uint32_t previous = 0;
  for (;;) {
    std::uint64_t st = await_unlocked(s.state);
    previous = value_of(st);
    if (count > max || previous > max - count) return make_error_code(errc::semaphore_limit);
    if (s.state.compare_exchange_weak(st, make_state(0, previous + count))) break;
  }
  notify(s, count > INT_MAX ? INT_MAX : static_cast<int>(count));
  return previous;
}

error_code release_mutex(slot& s) {
  if (static_cast<object_type>(s.type.load(std::memory_order_acquire)) != object_type::mutex) {
    return make_error_code(errc::wrong_type);
  }
  const self_id me = self();
  if (value_of(await_unlocked(s.state)) != me.tid) return make_error_code(errc::not_owner);
  const std::uint32_t depth = s.recursion.load();
  if (depth > 1) {
    s.recursion.store(depth - 1);
    return {};
  }
  // owner_pid stays: it names the owner for the daemon's repair until the
  // value is 0, so a death at any step here still abandons (or has freed) the
  // mutex. A stale owner_pid beside value 0 means nothing, and the next owner
  // overwrites it under the lock before it commits its tid.
  s.recursion.store(0);
  if (auto hook = release_step_hook) hook(1);
  for (;;) {
    std::uint64_t st = await_unlocked(s.state);
    if (s.state.compare_exchange_weak(st, make_state(0, 0))) break;
  }
  if (auto hook = release_step_hook) hook(2);
  notify(s, 1);
  note_mutex_released(me);
  return {};
}

bool abandon_if_owned_by(slot& s, self_id owner) noexcept {
  if (static_cast<object_type>(s.type.load(std::memory_order_acquire)) != object_type::mutex)
    return false;
  for (;;) {
    std::uint64_t st = await_unlocked(s.state);
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

result<wait_result> wait(segment_view v, std::span<const wait_target> targets, bool all,
                         std::chrono::nanoseconds timeout, std::chrono::nanoseconds spin) {
  if (targets.empty() || targets.size() > max_wait_objects)
    return make_error_code(errc::invalid_argument);
  const self_id me = self();
  const bool forever = timeout.count() < 0;

  std::optional<error_code> failure;
  auto attempt = [&]() -> std::optional<wait_result> {
    for (const auto& t : targets) {
      if (!still_valid(t)) {
        failure = make_error_code(errc::stale_handle);
        return std::nullopt;
      }
    }
    if (all) {
      auto r = try_take_all(targets, me);
      if (r) {
        for (const auto& t : targets)
          if (t.type == object_type::mutex) note_mutex_owned(v, index_in(v, t), me);
      }
      return r;
    }
    for (std::size_t i = 0; i < targets.size(); ++i) {
      bool abandoned = false;
      if (try_take(*targets[i].s, targets[i].type, me, abandoned)) {
        if (targets[i].type == object_type::mutex) note_mutex_owned(v, index_in(v, targets[i]), me);
        return wait_result{abandoned ? wait_status::abandoned : wait_status::signalled, i};
      }
    }
    return std::nullopt;
  };

  if (auto r = attempt()) return *r;
  if (failure) return *failure;
  if (!v.running()) return make_error_code(errc::daemon_lost);
  if (!forever && timeout.count() == 0) return wait_result{wait_status::timed_out, 0};

  // The clock is read only for a deadline or a spin: a wait forever that does
  // not spin (one CPU: the budget fell to zero) reads none, and learns that a
  // second has passed from its sleep timing out instead.
  const std::chrono::nanoseconds budget = spin_budget(spin);
  steady::time_point start{};
  steady::time_point deadline = steady::time_point::max();
  if (!forever || budget.count() > 0) {
    start = steady::now();
    // Saturated: start + a huge timeout would overflow into the past.
    if (!forever && timeout < steady::time_point::max() - start) deadline = start + timeout;
  }

  // Spin first: a cross-core futex wake costs tens of microseconds on a VM,
  // while a peer spinning on the shared word sees a change in well under one.
  // But a spin only pays when the signaller runs on another CPU meanwhile; when
  // both share one, the spin just delays it. So each thread adapts its budget
  // (at most `spin`): a spin that ends in sleep halves it, one that succeeds
  // doubles it, and a thread whose budget fell to nothing probes now and then.
  if (budget.count() > 0) {
    const auto spin_until = std::min(deadline, start + budget);
    for (unsigned round = 0;; ++round) {
      for (int i = 0; i < 16; ++i) cpu_relax();
      if (auto r = attempt()) {
        spin_paid(spin, true);
        return *r;
      }
      if (failure) return *failure;
      if ((round & 15) == 0 && steady::now() >= spin_until) break;
    }
    if (spin_until < deadline) spin_paid(spin, false);
  }

  // Then give the CPU away once. When the signaller shares our CPU (one CPU, or
  // a busy machine) it runs now, and the wait succeeds with no futex sleep and
  // no wake on either side: a sleep and a wake cost a timer and two system
  // calls more than a yield (about 1.2 us instead of 1.9 us a round trip on one
  // CPU). When it does not, the yield returns at once, before a sleep that costs
  // far more; and a thread whose yields stop paying backs off (see yield_due).
  if (yield_due()) {
    ::sched_yield();
    auto r = attempt();
    yield_paid(r.has_value());
    if (r) return *r;
    if (failure) return *failure;
  }

  // Registered as a sleeper before reading seq and retrying: a waker changes the
  // state, bumps seq and then reads `waiters` (all seq_cst). If it saw no sleeper,
  // our registration came later in the total order, so our retry sees its change;
  // if it saw us, it wakes us, or our futex_wait finds seq moved on.
  const bool multi = targets.size() > 1;
  for (const auto& t : targets) {
    if (multi) t.s->multi_waiters.fetch_add(1, std::memory_order_seq_cst);
    t.s->waiters.fetch_add(1, std::memory_order_seq_cst);
  }
  // Filled per entry below: zeroing all 64 entries on every wait shows in the
  // ping-pong benchmark.
  std::array<struct futex_waitv, max_wait_objects>
      vec;  // NOLINT(cppcoreguidelines-pro-type-member-init)
  result<wait_result> outcome = wait_result{wait_status::timed_out, 0};
  const std::chrono::nanoseconds slice_length(sleep_slice_ns.load(std::memory_order_relaxed));
  // Sleep that ran out its slice since the last look at the daemon; a look is
  // also due after many wakes that took nothing, so a waiter woken over and over
  // still notices a dead daemon.
  std::chrono::nanoseconds slept_out{0};
  unsigned wakes_since_look = 0;
  std::size_t fallback_turn = 0;
  for (;;) {
    for (std::size_t i = 0; i < targets.size(); ++i) {
      vec[i].val = targets[i].s->seq.load(std::memory_order_seq_cst);
      vec[i].uaddr = reinterpret_cast<std::uintptr_t>(&targets[i].s->seq);
      vec[i].flags = FUTEX_32;  // shared, not FUTEX_PRIVATE_FLAG
      vec[i].__reserved = 0;
    }
    if (auto r = attempt()) {
      outcome = *r;
      break;
    }
    if (failure) {
      outcome = *failure;
      break;
    }
    if (!v.running()) {
      outcome = make_error_code(errc::daemon_lost);
      break;
    }
    const auto now = forever ? steady::time_point{} : steady::now();
    if (!forever && now >= deadline) break;
    if (slept_out >= slice_length || wakes_since_look >= 64) {
      slept_out = std::chrono::nanoseconds(0);
      wakes_since_look = 0;
      // A daemon killed before it could say so: whoever notices first tells
      // every process waiting in this segment.
      if (!process_alive(v.header->daemon_pid.load())) {
        publish_state(v, daemon_state::stopped);
        outcome = make_error_code(errc::daemon_lost);
        break;
      }
      // A mutex whose owning thread vanished without abandoning it.
      bool freed = false;
      for (const auto& t : targets)
        if (t.type == object_type::mutex) freed = abandon_if_owner_vanished(*t.s) || freed;
      if (freed) continue;
    }
    bool timed_out = false;
    std::chrono::nanoseconds slice{};
    if (targets.size() == 1 || waitv_unusable.load(std::memory_order_relaxed)) {
      // One object: FUTEX_WAIT. Several without futex_waitv: one object at a
      // time, in short slices, turn by turn; a change on another is seen within
      // one slice. Sleeps are sliced either way: a daemon that vanished without
      // waking us (kill -9 before any client noticed) is seen on a later turn.
      const std::size_t turn = targets.size() == 1 ? 0 : fallback_turn++ % targets.size();
      slice = targets.size() == 1 ? slice_length
                                  : std::min(slice_length, std::chrono::nanoseconds(2'000'000));
      if (!forever) slice = std::min<std::chrono::nanoseconds>(deadline - now, slice);
      const timespec rel = to_timespec(slice);
      timed_out =
          futex_wait(&targets[turn].s->seq, static_cast<std::uint32_t>(vec[turn].val), &rel) < 0 &&
          errno == ETIMEDOUT;
    } else {
      timespec abs{};
      ::clock_gettime(CLOCK_MONOTONIC, &abs);
      slice = slice_length;
      if (!forever) slice = std::min<std::chrono::nanoseconds>(deadline - now, slice);
      const auto until =
          std::chrono::seconds(abs.tv_sec) + std::chrono::nanoseconds(abs.tv_nsec) + slice;
      abs = to_timespec(until);
      if (sys_futex_waitv(vec.data(), static_cast<unsigned>(targets.size()), &abs) < 0) {
        if (errno == ETIMEDOUT) {
          timed_out = true;
        } else if (errno != EAGAIN && errno != EINTR) {
          // ENOSYS (before 5.16), EPERM (seccomp), ...: never again, or every
          // multi-object wait would spin on the failing call.
          waitv_unusable.store(true, std::memory_order_relaxed);
        }
      }
    }
    if (timed_out) {
      slept_out += slice;
    } else {
      ++wakes_since_look;
    }
  }
  for (const auto& t : targets) {
    t.s->waiters.fetch_sub(1, std::memory_order_seq_cst);
    if (multi) t.s->multi_waiters.fetch_sub(1, std::memory_order_seq_cst);
  }
  return outcome;
}

void publish_slot(segment_view v, std::uint32_t index, std::uint32_t generation,
                  const object_init& init) {
  slot& s = v.at(index);
  const std::size_t n = std::min(init.name.size(), max_name_length);
  std::memset(s.name, 0, sizeof s.name);
  if (n > 0) std::memcpy(s.name, init.name.data(), n);
  s.name_length = static_cast<std::uint32_t>(n);
  s.max_count.store(init.max_count);
  s.owner_pid.store(init.owner_pid);
  s.recursion.store(init.type == object_type::mutex && init.value != 0 ? 1 : 0);
  s.abandoned.store(0);
  s.state.store(make_state(0, init.value));
  s.refcount.store(1);
  s.generation.store(generation, std::memory_order_release);
  s.type.store(static_cast<std::uint32_t>(init.type), std::memory_order_release);
}

void set_refcount(segment_view v, std::uint32_t index, std::uint32_t refs) {
  v.at(index).refcount.store(refs, std::memory_order_release);
}

void retire_slot(segment_view v, std::uint32_t index, std::uint32_t next_generation) {
  slot& s = v.at(index);
  s.type.store(static_cast<std::uint32_t>(object_type::none), std::memory_order_release);
  s.generation.store(next_generation, std::memory_order_release);
  s.refcount.store(0);
  s.state.store(make_state(0, 0));
  s.owner_pid.store(0);
  s.recursion.store(0);
  s.abandoned.store(0);
  s.name_length = 0;
  std::memset(s.name, 0, sizeof s.name);
  notify(s, INT_MAX);  // a waiter on a closed slot learns it is stale
}

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

void publish_state(segment_view v, daemon_state state) {
  v.header->state.store(static_cast<std::uint32_t>(state), std::memory_order_seq_cst);
  futex_wake(&v.header->state, INT_MAX);
  if (state == daemon_state::stopped) {
    for (std::uint32_t i = 0; i < v.capacity(); ++i) {
      slot& s = v.at(i);
      s.seq.fetch_add(1, std::memory_order_seq_cst);
      futex_wake(&s.seq, INT_MAX);
    }
  }
}

void (*release_step_hook)(int step) = nullptr;

void force_waitv_fallback(bool on) noexcept { waitv_unusable.store(on); }

void set_sleep_slice(std::chrono::nanoseconds slice) noexcept {
  sleep_slice_ns.store(slice.count() > 0 ? slice.count() : 1'000'000'000);
}

std::uint32_t slot_value(const slot& s) noexcept { return value_of(s.state.load()); }

void wait_while_starting(segment_view v, std::chrono::milliseconds timeout) {
  const std::uint32_t starting = static_cast<std::uint32_t>(daemon_state::starting);
  if (v.header->state.load() != starting) return;
  const timespec rel = to_timespec(timeout);
  futex_wait(&v.header->state, starting, &rel);
}

}  // namespace uipc::handles::detail
