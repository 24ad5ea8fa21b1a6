// The handle segment itself: its layout (format, attach), the daemon's writes
// to slots and header (publish, refcount, retire, state), and what every
// operation on it shares (this thread's identity, handle checks, the wait for a
// slot's transaction lock). The object operations are in slot_ops.cpp and
// slot_wait.cpp, the daemon's repairs in repair.cpp. See segment.hpp for who
// may write which field.
#include "segment.hpp"

#include <pthread.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <new>

#include "slot_state.hpp"
#include "uipc/core/futex.hpp"
#include "uipc/core/wait_policy.hpp"

namespace uipc::handles::detail {

// pid and tid cached per thread; a fork gives the child a new identity.
std::atomic<std::uint32_t> fork_generation{0};
constinit thread_local cached_self this_thread_self;

constinit thread_local bool met_transaction_lock = false;

std::uint64_t await_unlocked_slowly(std::atomic<std::uint64_t>& state,
                                    lock_patience until) noexcept {
  const bool brief = until == lock_patience::min();
  if (brief) until = lock_clock::now() + lock_try_patience;
  if (until == lock_bounded) until = lock_clock::now() + lock_wait_limit;
  for (unsigned spins = 0;; ++spins) {
    std::uint64_t s = state.load(std::memory_order_seq_cst);
    if (locker_of(s) == 0) return s;
    if (spins < 256) {
      cpu_relax();
      continue;
    }
    // Past the spin, a lock is no longer a few instructions away from its end:
    // the clock is worth reading.
    if (until != lock_patience::max() && lock_clock::now() >= until) {
      if (brief) {  // the take's caller sleeps a moment and tries again
        met_transaction_lock = true;
        return s;
      }
      // Giving up: a holder that died is undone now rather than left to the
      // daemon's repair (the next try finds the slot free).
      if (!process_is_gone(locker_of(s))) return s;
      if (state.compare_exchange_strong(s, make_state(0, value_of(s))))
        return make_state(0, value_of(s));
      continue;
    }
    yield_cpu();
    if (spins % 1024 == 0 && process_is_gone(locker_of(s))) {
      state.compare_exchange_strong(s, make_state(0, value_of(s)));
    }
    if (spins > 4096) {
      timespec pause{0, 200'000};
      ::nanosleep(&pause, nullptr);
    }
  }
}

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
  return {h,        slots,        base + h->scratch_offset,
          capacity, scratch_size, static_cast<std::int32_t>(::getpid()),
          epoch};
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
  // The header's word, read once; a client's connect puts the hello's in its place.
  return segment_view{h,
                      reinterpret_cast<slot*>(base + table),
                      base + scratch_at,
                      capacity,
                      scratch_size,
                      h->daemon_pid.load(),
                      h->epoch.load()};
}

self_id refresh_self() noexcept {
  static const bool registered = [] {
    ::pthread_atfork(nullptr, nullptr, [] { fork_generation.fetch_add(1); });
    return true;
  }();
  (void)registered;
  this_thread_self.generation = fork_generation.load(std::memory_order_relaxed);
  this_thread_self.id = {static_cast<std::int32_t>(::getpid()),
                         static_cast<std::uint32_t>(::gettid())};
  return this_thread_self.id;
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
  // A waiter on a closed slot learns it is stale. Bumped whether or not a
  // sleeper is registered (unlike notify()): a waiter that registers just
  // after is ordered against this RMW, and so sees the new generation, which
  // is stored with release only; closing a slot is rare.
  s.seq.fetch_add(1, std::memory_order_seq_cst);
  futex::wake(s.seq, INT_MAX);
}

void publish_state(segment_view v, daemon_state state) {
  v.header->state.store(static_cast<std::uint32_t>(state), std::memory_order_seq_cst);
  futex::wake(v.header->state, INT_MAX);
  if (state == daemon_state::stopped) {
    for (std::uint32_t i = 0; i < v.capacity(); ++i) {
      slot& s = v.at(i);
      s.seq.fetch_add(1, std::memory_order_seq_cst);
      futex::wake(s.seq, INT_MAX);
    }
  }
}

void (*release_step_hook)(int step) = nullptr;
void (*take_step_hook)(int step) = nullptr;

}  // namespace uipc::handles::detail
