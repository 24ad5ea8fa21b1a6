// Reader slots and grace periods (see epoch.hpp).
#include "epoch.hpp"

#include <linux/membarrier.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace uipc::plugin::detail {
namespace {

std::atomic<reader_slot*> slots{nullptr};

int membarrier(int cmd) { return static_cast<int>(::syscall(__NR_membarrier, cmd, 0u, 0)); }

bool register_membarrier() {
  int supported = membarrier(MEMBARRIER_CMD_QUERY);
  if (supported < 0 || !(supported & MEMBARRIER_CMD_PRIVATE_EXPEDITED)) return false;
  return membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0;
}

const bool have_membarrier = register_membarrier();

reader_slot& acquire_slot() {
  for (reader_slot* s = slots.load(std::memory_order_acquire); s; s = s->next) {
    bool free = false;
    if (!s->in_use.load(std::memory_order_relaxed) &&
        s->in_use.compare_exchange_strong(free, true, std::memory_order_acquire))
      return *s;
  }
  auto* s = new reader_slot;  // never freed: grace periods may hold its address
  s->in_use.store(true, std::memory_order_relaxed);
  s->next = slots.load(std::memory_order_relaxed);
  while (!slots.compare_exchange_weak(s->next, s, std::memory_order_release,
                                      std::memory_order_relaxed)) {
  }
  return *s;
}

// Gives the slot back when the thread ends; its sequence is even then.
struct slot_owner {
  reader_slot& slot = acquire_slot();
  ~slot_owner() {
    current_slot = nullptr;
    fast_slot = nullptr;
    slot.in_use.store(false, std::memory_order_release);
  }
};

}  // namespace

bool readers_fence = !have_membarrier;
constinit thread_local reader_slot* current_slot = nullptr;
constinit thread_local reader_slot* fast_slot = nullptr;

reader_slot& attach_this_thread() {
  thread_local slot_owner owner;
  current_slot = &owner.slot;
  if (!readers_fence) fast_slot = &owner.slot;
  return owner.slot;
}

void heavy_fence() noexcept {
  if (have_membarrier)
    membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED);
  else
    std::atomic_thread_fence(std::memory_order_seq_cst);
}

grace_period grace_period::begin() {
  heavy_fence();
  grace_period g;
  for (const reader_slot* s = slots.load(std::memory_order_acquire); s; s = s->next) {
    std::uint64_t seq = s->seq.load(std::memory_order_acquire);
    if (seq & 1) g.inside_.emplace_back(s, seq);
  }
  return g;
}

bool grace_period::over() const noexcept {
  for (const auto& [slot, seq] : inside_)
    if (slot->seq.load(std::memory_order_acquire) == seq) return false;
  return true;
}

}  // namespace uipc::plugin::detail
