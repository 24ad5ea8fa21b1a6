// The handle daemon's shared segment: its layout, and every operation that runs
// on it (layout and the daemon's writes: segment.cpp; signal, reset, release:
// slot_ops.cpp; waits: slot_wait.cpp; the daemon's repair of dead processes:
// repair.cpp; what they share: slot_state.hpp).
//
// Who writes what (the rules that keep the table consistent when any process dies
// at any instruction):
//  - The daemon alone writes the header and each slot's lifetime fields (type,
//    generation, refcount, max_count, name). It keeps its own private copy of them
//    and never trusts what it reads back from shared memory.
//  - Object state is one 64-bit atomic word per slot: the low half is the value
//    (event: 0/1, semaphore: count, mutex: owner tid), the high half the pid of a
//    process that holds the slot's transaction lock (0: none). Simple operations
//    are one CAS on an unlocked word. Operations that must change more than one
//    word (taking a mutex, wait-all) lock the word, write the side fields, and
//    unlock by storing the new value. A process that dies holding a lock is found
//    by its pid: the daemon (told of every client's death by its socket) or a
//    spinning peer (kill(pid, 0) == ESRCH) restores the old value.
//  - Each slot has a 32-bit futex word `seq`, bumped after a change that may
//    satisfy a waiter while one is registered as a sleeper, and a `waiters`
//    count so that a change costs no bump and no system call when nobody sleeps. Waits follow the
//    core's wait policy and sleep with the core's futex wrappers (uipc/core/wait_policy.hpp,
//    futex.hpp), which never use the private flag: waiter and waker are different processes.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>

#include "uipc/core/death_flag.hpp"
#include "uipc/core/process.hpp"
#include "uipc/core/shm.hpp"
#include "uipc/handles/error.hpp"
#include "uipc/handles/types.hpp"

namespace uipc::handles::detail {

/// Magic "uipchdl1" and layout version of the segment.
inline constexpr segment_identity identity{0x75697063'68646c31ULL, 3};

/// The daemon's life, published in the header (a futex word: publish_state wakes it).
enum class daemon_state : std::uint32_t {
  starting = 0,
  running = 1,
  died_at_startup = 2,
  stopped = 3,  ///< exited in order, or found gone by a client
};

struct alignas(64) segment_header {
  std::atomic<std::uint32_t> state;
  std::atomic<std::int32_t> daemon_pid;
  /// The daemon's death flag (uipc/core/death_flag.hpp): the kernel marks it
  /// when the daemon's process dies, so an operation learns of a kill -9 with
  /// one load instead of asking the kernel.
  std::atomic<std::uint32_t> death_word;
  std::atomic<std::uint64_t> epoch;
  std::uint32_t capacity;
  std::uint32_t slot_size;
  std::uint64_t table_offset;
  std::uint64_t scratch_offset;
  std::uint64_t scratch_size;
};

struct alignas(64) slot {
  // Lifetime fields: the daemon's alone.
  std::atomic<std::uint32_t> type;
  std::atomic<std::uint32_t> generation;
  std::atomic<std::uint32_t> refcount;
  std::atomic<std::uint32_t> max_count;
  // Object state: every process.
  std::atomic<std::uint64_t> state;
  std::atomic<std::uint32_t> seq;
  std::atomic<std::uint32_t> waiters;
  /// Of `waiters`, those asleep on several objects (wait-any/wait-all of more
  /// than one): a wake-one could pick one of them that then takes nothing (or
  /// another object), so while any sleeps a wake-one wakes every sleeper.
  std::atomic<std::uint32_t> multi_waiters;
  std::atomic<std::int32_t> owner_pid;   ///< mutex: the owner's process, written under the lock
  std::atomic<std::uint32_t> recursion;  ///< mutex: written by the owner (or under the lock)
  /// mutex: set by whoever abandons it (the daemon's repair, a thread's exit,
  /// a waiter that found the owning thread gone); cleared by the next owner
  /// after its commit, so a taker that dies before it leaves the flag set.
  std::atomic<std::uint32_t> abandoned;
  std::uint32_t name_length;
  char name[max_name_length + 1];
};

static_assert(std::atomic<std::uint64_t>::is_always_lock_free);
static_assert(std::atomic<std::uint32_t>::is_always_lock_free &&
              sizeof(std::atomic<std::uint32_t>) == 4);

/// Bytes of segment needed for `capacity` slots and `scratch_size` bytes of scratch.
std::size_t segment_bytes(std::uint32_t capacity, std::size_t scratch_size);

/// A mapped segment, seen through its layout. Cheap to copy; does not own the mapping.
/// Capacity and scratch size are this process's own copies, checked against the
/// mapping once: what the header says later (any process of the user can write
/// it) never sends a loop past the table.
struct segment_view {
  segment_header* header = nullptr;
  slot* slots = nullptr;
  std::byte* scratch = nullptr;
  std::uint32_t slot_count = 0;
  std::uint64_t scratch_bytes = 0;
  /// The daemon's pid and the segment's epoch as the daemon said them (its
  /// hello), kept here: any client may write the header's copies.
  std::int32_t daemon_pid = 0;
  std::uint64_t epoch = 0;

  std::uint32_t capacity() const noexcept { return slot_count; }
  std::uint64_t scratch_size() const noexcept { return scratch_bytes; }
  slot& at(std::uint32_t index) const noexcept { return slots[index]; }
  bool running() const noexcept {
    return header->state.load(std::memory_order_acquire) ==
           static_cast<std::uint32_t>(daemon_state::running);
  }
  /// Whether the daemon's process died (however: a kill -9 publishes no state).
  bool daemon_died() const noexcept { return death_marked(header->death_word); }
};

/// Lays out a fresh (zeroed) segment and publishes state "starting".
segment_view format_segment(void* data, std::size_t size, std::uint32_t capacity,
                            std::size_t scratch_size, std::uint64_t epoch);
/// Checks a mapped segment's layout against the mapping's size and the capacity
/// and scratch size the daemon announced; errc::bad_segment (core) when it does
/// not fit.
result<segment_view> attach_segment(void* data, std::size_t size, std::uint32_t capacity,
                                    std::uint64_t scratch_size);

/// This thread's identity as mutexes record it (cached; correct after fork).
struct self_id {
  std::int32_t pid;
  std::uint32_t tid;
};
struct cached_self {
  std::uint32_t generation = UINT32_MAX;  ///< fork_generation when filled
  self_id id{};
};
/// Bumped in the child of every fork (an atfork handler registered by the
/// first refresh_self()): a cache filled before it is the parent's.
extern std::atomic<std::uint32_t> fork_generation;
extern constinit thread_local cached_self this_thread_self;
/// Fills this thread's cache (the first call of each thread, and after a fork).
self_id refresh_self() noexcept;
inline self_id self() noexcept {
  if (this_thread_self.generation == fork_generation.load(std::memory_order_relaxed)) [[likely]]
    return this_thread_self.id;
  return refresh_self();
}

// ---- client side: object operations, no daemon round trip -------------------

/// Whether the daemon of the segment with header `h` serves and lives as its
/// header says: state running, the death word armed and not marked. False
/// also for a daemon without a death flag, which only the kernel can vouch
/// for (see mapping::daemon_gone). Inline: every object operation starts here.
inline bool daemon_serving(const segment_header& h) noexcept {
  const std::uint32_t word = h.death_word.load(std::memory_order_acquire);
  return h.state.load(std::memory_order_acquire) ==
             static_cast<std::uint32_t>(daemon_state::running) &&
         word != 0 && (word & death_mark) == 0;
}

/// Why slot `s` does not hold the live object of `generation` (and type
/// `expected`; none accepts every live type): errc::stale_handle or
/// wrong_type; errc{} when it does. Inline: every object operation starts here.
inline errc slot_mismatch(const slot& s, std::uint32_t generation, object_type expected) noexcept {
  const auto type = static_cast<object_type>(s.type.load(std::memory_order_acquire));
  if (s.generation.load(std::memory_order_acquire) != generation || type == object_type::none)
      [[unlikely]]
    return errc::stale_handle;
  if (expected != object_type::none && type != expected) [[unlikely]]
    return errc::wrong_type;
  return {};
}

/// Finds the slot of `h`: errc::invalid_handle, or slot_mismatch()'s error.
inline result<slot*> checked_slot(segment_view v, handle_id h, object_type expected) {
  if (h.index >= v.capacity() || h.generation == 0) [[unlikely]]
    return make_error_code(errc::invalid_handle);
  slot& s = v.at(h.index);
  if (const errc e = slot_mismatch(s, h.generation, expected); e != errc{}) [[unlikely]]
    return make_error_code(e);
  return &s;
}

/// What take_now() (slot_state.hpp) did. A plain enum, returned in a
/// register: an optional<wait_status> came back as two stores read as one
/// load, a store-forwarding stall on every take.
enum class take_outcome : std::uint32_t { busy, signalled, abandoned };

error_code signal_event(slot& s);
error_code reset_event(slot& s);
/// `v`: the segment `s` is in, as the caller sees it, which finds the thread's
/// record of the mutex at once (null: the record is swept instead).
error_code release_mutex(slot& s, const segment_view* v = nullptr);

/// Abandons mutex `s` if the thread `owner` holds it (whatever its recursion):
/// the next owner is told, and a waiter is woken. For a thread that exits
/// holding it (see owned_mutexes.hpp). Returns whether it did.
bool abandon_if_owned_by(slot& s, self_id owner) noexcept;

/// One object of a wait set.
struct wait_target {
  slot* s;
  object_type type;
  std::uint32_t generation;
};

/// Waits until one (all=false) or every (all=true) target is signalled, then takes
/// it (them): a wait-all takes nothing until every object can be taken at once.
/// timeout < 0: forever. Spins up to `spin` (this thread's adaptive budget, see
/// uipc::wait_policy), yields once, then sleeps on the slots' futex words in
/// slices (set_sleep_slice) with a look at the daemon after each.
/// Errors: errc::daemon_lost when the daemon stops meanwhile, stale_handle if a
/// target's slot was closed under the wait.
result<wait_result> wait(segment_view v, std::span<const wait_target> targets, bool all,
                         std::chrono::nanoseconds timeout, std::chrono::nanoseconds spin);

// ---- daemon side --------------------------------------------------------------

/// Initial state of a new object.
struct object_init {
  object_type type = object_type::none;
  std::uint32_t value = 0;      ///< event 0/1, semaphore count, mutex owner tid (0: free)
  std::int32_t owner_pid = 0;   ///< mutex created owned
  std::uint32_t max_count = 0;  ///< semaphore
  std::string_view name;
};

/// Publishes a new object in a free slot; its type is stored last (release).
void publish_slot(segment_view v, std::uint32_t index, std::uint32_t generation,
                  const object_init& init);
/// Mirrors a refcount into the slot (informational for clients).
void set_refcount(segment_view v, std::uint32_t index, std::uint32_t refs);
/// Retires a slot: type none, the next generation, state cleared, waiters woken.
void retire_slot(segment_view v, std::uint32_t index, std::uint32_t next_generation);
/// What one repair pass did.
struct repair_result {
  std::uint32_t abandoned = 0;  ///< mutexes abandoned
  /// A slot was transaction-locked by a live process, so the pass could not
  /// finish there; run it again later (it never waits for a lock).
  bool incomplete = false;
};
/// Repairs what the process `pid` left when its last session ended: mutexes it
/// owned are abandoned and their waiters woken, and transaction locks it held
/// are undone once it is gone — `exited` when its pidfd said so, else the
/// kernel is asked by pid (a process whose session was dropped may live on,
/// and its lock is a transaction in progress: the result is then incomplete).
/// `types` is the daemon's own record of each slot's type (index i: slot i;
/// what the segment says is not trusted). Never spins on a lock another live
/// process holds: such a slot is skipped and the result says so. A lock held
/// by the daemon's own pid is never undone (the repair's own locks end before
/// it returns: one seen here is a client thread of the daemon's process).
/// Idempotent.
repair_result repair_dead_process(segment_view v, std::int32_t pid,
                                  std::span<const object_type> types, bool exited);
/// Publishes the daemon's state and wakes everyone waiting on it; for `stopped`
/// also every object's waiters, who then fail with errc::daemon_lost.
void publish_state(segment_view v, daemon_state state);
/// The value half of a slot's state (for list, and the owned-mutex records
/// when they sweep: inline).
inline std::uint32_t slot_value(const slot& s) noexcept {
  return static_cast<std::uint32_t>(s.state.load());
}

/// Test hooks (null in production). `release_step` is called between the steps
/// of release_mutex, so a test can kill the process there.
extern void (*release_step_hook)(int step);
/// Called (step 1) by a take of an abandoned mutex under the slot's lock,
/// before the take commits, so a test can kill the taker there. Only on that
/// path: an ordinary take pays nothing for it.
extern void (*take_step_hook)(int step);
/// The longest a wait sleeps before it looks whether the daemon (and, for a
/// mutex, the owning thread) still lives; 1 s. Tests lengthen it to prove that
/// a wake comes from the event itself, not from a later look.
void set_sleep_slice(std::chrono::nanoseconds slice) noexcept;

}  // namespace uipc::handles::detail
