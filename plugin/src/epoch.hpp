// Epoch-based reclamation for the service registry: readers (calls) pay two
// thread-local stores; a writer (unregister, reload) retires what it unpublished
// and frees it once every call that could have seen it has ended.
//
// Each thread that calls has a reader slot with a sequence number: odd while
// the thread is inside a call (outermost section), even outside. A writer
// unpublishes an object, makes every thread's slot store visible with one
// membarrier(2) (MEMBARRIER_CMD_PRIVATE_EXPEDITED: the asymmetric fence that
// lets readers use a compiler barrier instead of a CPU fence), and snapshots
// the odd slots. The object may go once each of those slots has moved on.
// Where membarrier is missing, readers fall back to a full fence.
#pragma once

#include <atomic>
#include <cstdint>
#include <vector>

namespace uipc::plugin::detail {

struct reader_slot {
  std::atomic<std::uint64_t> seq{0};  // odd inside the outermost section; only its thread writes it
  std::atomic<bool> in_use{false};
  reader_slot* next = nullptr;  // the process-wide list; slots are never freed
};

/// The calling thread's slot, once it has one. constinit: reading it is one
/// thread-pointer-relative load, with no initialisation check.
extern constinit thread_local reader_slot* current_slot;
/// The same where readers need no fence of their own (membarrier works), null
/// otherwise: the call fast path reads this one alone.
extern constinit thread_local reader_slot* fast_slot;
/// Gives the calling thread a slot (made, or taken over from an exited thread).
reader_slot& attach_this_thread();

inline reader_slot& this_thread_slot() {
  reader_slot* s = current_slot;
  if (!s) [[unlikely]]
    return attach_this_thread();
  return *s;
}
/// Whether readers need their own fence (no membarrier on this kernel).
extern bool readers_fence;

/// A full memory barrier on every thread of the process that runs now
/// (membarrier), or on this one alone where membarrier is missing.
void heavy_fence() noexcept;

/// Marks the calling thread inside a call for its scope. Nestable: a section
/// inside another (the sequence is odd already) changes nothing.
class read_section {
 public:
  read_section() noexcept : slot_(this_thread_slot()) {
    const std::uint64_t seq = slot_.seq.load(std::memory_order_relaxed);
    outer_ = (seq & 1) == 0;
    if (outer_) {
      slot_.seq.store(seq + 1, std::memory_order_relaxed);
      if (readers_fence) [[unlikely]]
        std::atomic_thread_fence(std::memory_order_seq_cst);
      else
        std::atomic_signal_fence(std::memory_order_seq_cst);
    }
  }
  ~read_section() {
    if (outer_)
      slot_.seq.store(slot_.seq.load(std::memory_order_relaxed) + 1, std::memory_order_release);
  }
  read_section(const read_section&) = delete;
  read_section& operator=(const read_section&) = delete;

 private:
  reader_slot& slot_;
  bool outer_;
};

/// Who was inside a call when something was unpublished.
class grace_period {
 public:
  /// Call after unpublishing: fences every thread, then records the readers inside.
  static grace_period begin();
  /// Whether every reader recorded has left the section it was in.
  bool over() const noexcept;

 private:
  std::vector<std::pair<const reader_slot*, std::uint64_t>> inside_;
};

}  // namespace uipc::plugin::detail
