// Waits on objects in shared memory: take one (wait-any) or all of a set
// (wait-all), spinning, yielding and then sleeping on the slots' futex words as
// the core's wait policy says, with a look at the daemon (and at a mutex's
// owning thread) after every slice of sleep. See segment.hpp for who may write
// which field.
#include <algorithm>
#include <array>
#include <climits>
#include <optional>

#include "owned_mutexes.hpp"
#include "segment.hpp"
#include "slot_state.hpp"
#include "uipc/core/futex.hpp"
#include "uipc/core/wait_policy.hpp"

namespace uipc::handles::detail {

namespace {

using steady = std::chrono::steady_clock;

// Takes one unit of a single object, waiting out a transaction lock for a
// take's patience (lock_patience::min()). Sets `abandoned` for a mutex whose
// last owner died.
bool try_take(slot& s, object_type type, const self_id& me, bool& abandoned) noexcept {
  switch (type) {
    case object_type::manual_event:
    case object_type::auto_event:
    case object_type::semaphore:
      return take_unit(s, type);
    case object_type::mutex:
      for (;;) {
        std::uint64_t st = await_unlocked(s.state, lock_patience::min());
        if (locker_of(st) != 0) return false;
        const std::uint32_t owner = value_of(st);
        if (owner == me.tid) {  // recursion: only the owner touches the count
          s.recursion.fetch_add(1);
          return true;
        }
        if (owner != 0) return false;
        if (!s.state.compare_exchange_weak(st, make_state(static_cast<std::uint32_t>(me.pid), 0)))
          continue;
        // Under our lock nobody else writes these, and the state's release
        // store publishes them with our tid: plain stores, no locked ones.
        // (A death before it leaves the lock to the repair, which restores
        // the free mutex: a stale owner_pid beside value 0 means nothing.)
        abandoned = s.abandoned.load(std::memory_order_relaxed) != 0;
        s.owner_pid.store(me.pid, std::memory_order_relaxed);
        s.recursion.store(1, std::memory_order_relaxed);
        if (abandoned) [[unlikely]] {
          if (auto hook = take_step_hook) hook(1);
          // The flag goes only once the mutex is ours: a death before the
          // commit gives the mutex back still abandoned (the repair restores
          // the state word alone), and one after it abandons it again.
          s.state.store(make_state(0, me.tid), std::memory_order_release);
          s.abandoned.store(0, std::memory_order_relaxed);
          return true;
        }
        s.state.store(make_state(0, me.tid), std::memory_order_release);
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
// A slot whose transaction lock outlasts a take's patience fails the try: the
// slots locked so far are unlocked unchanged.
std::optional<wait_result> try_take_all(std::span<const wait_target> targets,
                                        const self_id& me) noexcept {
  std::array<std::uint32_t, max_wait_objects> before{};
  const auto locker = static_cast<std::uint32_t>(me.pid);
  for (std::size_t i = 0; i < targets.size(); ++i) {
    auto& st = targets[i].s->state;
    for (;;) {
      std::uint64_t s = await_unlocked(st, lock_patience::min());
      if (locker_of(s) != 0) {
        for (std::size_t j = 0; j < i; ++j) targets[j].s->state.store(make_state(0, before[j]));
        return std::nullopt;
      }
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
    bool was_abandoned = false;
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
          was_abandoned = s.abandoned.load() != 0;
          if (was_abandoned) {
            if (r.status != wait_status::abandoned) r = {wait_status::abandoned, i};
            if (auto hook = take_step_hook) hook(1);
          }
          s.owner_pid.store(me.pid);
          s.recursion.store(1);
          after = me.tid;
        }
        break;
      default:
        break;
    }
    s.state.store(make_state(0, after));
    // As in try_take: the abandoned flag goes once the mutex is ours.
    if (was_abandoned) s.abandoned.store(0);
  }
  return r;
}

// A slot closed under a waiter is reported, never taken under its new identity.
bool still_valid(const wait_target& t) noexcept {
  return t.s->generation.load(std::memory_order_acquire) == t.generation &&
         t.s->type.load(std::memory_order_acquire) == static_cast<std::uint32_t>(t.type);
}

std::uint32_t index_in(const segment_view& v, const wait_target& t) noexcept {
  return static_cast<std::uint32_t>(t.s - v.slots);
}

// Takes one unit of `t` for a wait-any; a mutex taken goes on this thread's record.
bool take_one(const segment_view& v, const wait_target& t, const self_id& me,
              bool& abandoned) noexcept {
  if (!try_take(*t.s, t.type, me, abandoned)) return false;
  if (t.type == object_type::mutex) note_mutex_owned(v, index_in(v, t), me);
  return true;
}

}  // namespace

take_outcome take_mutex_now(const segment_view& v, slot& s) noexcept {
  bool abandoned = false;
  if (!take_one(v, {&s, object_type::mutex, 0}, self(), abandoned)) return take_outcome::busy;
  return abandoned ? take_outcome::abandoned : take_outcome::signalled;
}

namespace {

// How long a sleep lasts before a look at the daemon (set_sleep_slice).
std::atomic<std::int64_t> sleep_slice_ns{1'000'000'000};

}  // namespace

result<wait_result> wait(segment_view v, std::span<const wait_target> targets, bool all,
                         std::chrono::nanoseconds timeout, std::chrono::nanoseconds spin) {
  if (targets.empty() || targets.size() > max_wait_objects)
    return make_error_code(errc::invalid_argument);
  const self_id me = self();
  const bool forever = timeout.count() < 0;

  // The common case first, returned straight: one object, available now. (Through
  // the general attempt below, the outcome went through memory and back, a
  // store-forwarding stall that was most of an uncontended take.) A lock that
  // stays is slept on below, up to the deadline.
  if (targets.size() == 1 && !all) {
    const wait_target& t = targets[0];
    if (!still_valid(t)) return make_error_code(errc::stale_handle);
    bool abandoned = false;
    if (take_one(v, t, me, abandoned))
      return wait_result{abandoned ? wait_status::abandoned : wait_status::signalled, 0};
  }

  // The outcome of a try: taken (a wait_result), failed (stale_handle), or not yet.
  std::optional<result<wait_result>> outcome;
  auto attempt = [&]() -> bool {
    met_transaction_lock = false;
    for (const auto& t : targets) {
      if (!still_valid(t)) {
        outcome = make_error_code(errc::stale_handle);
        return true;
      }
    }
    // Every try spins a moment at most on a transaction lock: a lock that
    // stays is slept on between tries (below), so a wait-all never holds its
    // other slots locked meanwhile, and a wait-any looks at its other targets.
    if (all) {
      auto r = try_take_all(targets, me);
      if (!r) return false;
      for (const auto& t : targets)
        if (t.type == object_type::mutex) note_mutex_owned(v, index_in(v, t), me);
      outcome = *r;
      return true;
    }
    for (std::size_t i = 0; i < targets.size(); ++i) {
      bool abandoned = false;
      if (take_one(v, targets[i], me, abandoned)) {
        outcome = wait_result{abandoned ? wait_status::abandoned : wait_status::signalled, i};
        return true;
      }
    }
    return false;
  };

  if (attempt()) return *outcome;
  if (!v.running()) return make_error_code(errc::daemon_lost);
  if (!forever && timeout.count() == 0) return wait_result{wait_status::timed_out, 0};

  // The clock is read only for a deadline or a spin: a wait forever that does
  // not spin (one CPU: the budget fell to zero) reads none, and learns that a
  // second has passed from its sleep timing out instead.
  wait_policy& policy = wait_policy::this_thread();
  const std::chrono::nanoseconds budget = policy.spin_budget(spin);
  steady::time_point start{};
  steady::time_point deadline = steady::time_point::max();
  if (!forever || budget.count() > 0) {
    start = steady::now();
    // Saturated: start + a huge timeout would overflow into the past.
    if (!forever && timeout < steady::time_point::max() - start) deadline = start + timeout;
  }

  // Spin while the signaller may run on another CPU, then give the CPU away
  // once in case it shares ours (the policy learns which pays on this thread).
  // The spin looks with loads: it tries a take (a compare-exchange, which
  // pulls the slot's line from its owner) only when the slots say it may
  // succeed (a wait-all: every slot), or one changed under us. A wait on a
  // mutex looks every 16th pause, not every one: one that pounced on every
  // release took the mutex from an owner about to take it again three times
  // as often (BM_Mutex_Contended: 5 % of takes handed over, 15 % looking at
  // every pause; 1.7x the time a take).
  const bool on_a_mutex = std::any_of(targets.begin(), targets.end(), [](const wait_target& t) {
    return t.type == object_type::mutex;
  });
  const auto worth_a_try = [&] {
    bool every = true, some = false;
    for (const auto& t : targets) {
      if (!still_valid(t)) return true;  // reported by the attempt
      const std::uint64_t st = t.s->state.load(std::memory_order_relaxed);
      const bool may = locker_of(st) != 0 || available(t.type, value_of(st), me);
      every = every && may;
      some = some || may;
    }
    return all ? every : some;
  };
  if (policy.spin_then_yield(
          spin, budget, start, deadline, [&] { return worth_a_try() && attempt(); },
          on_a_mutex ? 16 : 1))
    return *outcome;

  // Registered as a sleeper before reading seq and retrying: a waker changes the
  // state, then reads `waiters`, and bumps seq and wakes only if it saw one (all
  // seq_cst; notify() in slot_state.hpp). If it saw no sleeper, our registration
  // came later in the total order, so our retry sees its change; if it saw us,
  // it wakes us, or our futex sleep finds seq moved on.
  const bool multi = targets.size() > 1;
  for (const auto& t : targets) {
    if (multi) t.s->multi_waiters.fetch_add(1, std::memory_order_seq_cst);
    t.s->waiters.fetch_add(1, std::memory_order_seq_cst);
  }
  // Filled per entry below: zeroing all 64 entries on every wait shows in the
  // ping-pong benchmark.
  std::array<futex::watch, max_wait_objects>
      words;  // NOLINT(cppcoreguidelines-pro-type-member-init)
  const std::chrono::nanoseconds slice_length(sleep_slice_ns.load(std::memory_order_relaxed));
  // Sleep that ran out its slice since the last look at the daemon; a look is
  // also due after many wakes that took nothing, so a waiter woken over and over
  // still notices a dead daemon.
  std::chrono::nanoseconds slept_out{0};
  unsigned wakes_since_look = 0;
  // A transaction lock that stays wakes nobody when it goes: while one holds
  // a target, sleeps are short, growing to the slice.
  std::chrono::nanoseconds lock_backoff{50'000};
  for (;;) {
    for (std::size_t i = 0; i < targets.size(); ++i)
      words[i] = {&targets[i].s->seq, targets[i].s->seq.load(std::memory_order_seq_cst)};
    if (attempt()) break;
    if (!v.running()) {
      outcome = make_error_code(errc::daemon_lost);
      break;
    }
    const auto now = forever ? steady::time_point{} : steady::now();
    if (!forever && now >= deadline) {
      outcome = wait_result{wait_status::timed_out, 0};
      break;
    }
    if (slept_out >= slice_length || wakes_since_look >= 64) {
      slept_out = std::chrono::nanoseconds(0);
      wakes_since_look = 0;
      // A daemon killed before it could say so (the kernel marked its death
      // word; the kernel is asked too, once a slice, in case the word was not
      // armed or was written over): whoever notices first tells every process
      // waiting in this segment.
      if (v.daemon_died() || !process_alive(v.daemon_pid)) {
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
    // Sleeps are sliced: a daemon that vanished without waking us (kill -9
    // before any client noticed) is seen after a slice. One object: FUTEX_WAIT;
    // several: futex_waitv, or the core's fallback where the kernel lacks it.
    std::chrono::nanoseconds slice = slice_length;
    if (met_transaction_lock) {  // what the last try met, not a look now: the lock may be gone
      slice = std::min(slice, lock_backoff);
      lock_backoff = std::min<std::chrono::nanoseconds>(lock_backoff * 2, slice_length);
    } else {
      lock_backoff = std::chrono::nanoseconds(50'000);
    }
    if (!forever) slice = std::min<std::chrono::nanoseconds>(deadline - now, slice);
    const auto woke = futex::wait_any(std::span(words.data(), targets.size()), slice);
    if (woke && *woke == futex::wake_reason::timed_out) {
      slept_out += slice;
    } else {
      ++wakes_since_look;
    }
  }
  for (const auto& t : targets) {
    t.s->waiters.fetch_sub(1, std::memory_order_seq_cst);
    if (multi) t.s->multi_waiters.fetch_sub(1, std::memory_order_seq_cst);
  }
  return *outcome;
}

void set_sleep_slice(std::chrono::nanoseconds slice) noexcept {
  sleep_slice_ns.store(slice.count() > 0 ? slice.count() : 1'000'000'000);
}

}  // namespace uipc::handles::detail
