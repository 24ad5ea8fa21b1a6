// The adaptive spin -> yield -> sleep policy's per-thread state.
#include "uipc/core/wait_policy.hpp"

#include <sched.h>

#include <algorithm>

namespace uipc {

void yield_cpu() noexcept { ::sched_yield(); }

wait_policy& wait_policy::this_thread() noexcept {
  thread_local wait_policy policy;
  return policy;
}

std::chrono::nanoseconds wait_policy::spin_budget(std::chrono::nanoseconds limit) noexcept {
  const std::int64_t max = limit.count();
  if (max <= 0) return std::chrono::nanoseconds(0);
  if (budget_ns_ < 0 || budget_ns_ > max) budget_ns_ = max;
  if (budget_ns_ > 0) return std::chrono::nanoseconds(budget_ns_);
  if (++waits_without_spin_ % probe_every == 0) return std::min(limit, probe_spin);
  return std::chrono::nanoseconds(0);
}

void wait_policy::spin_ended(std::chrono::nanoseconds limit, bool satisfied) noexcept {
  const std::int64_t max = limit.count();
  if (satisfied) {
    budget_ns_ = std::min(max, std::max<std::int64_t>(budget_ns_ * 2, smallest_spin.count() * 2));
  } else {
    budget_ns_ /= 2;
    if (budget_ns_ < smallest_spin.count()) budget_ns_ = 0;
  }
}

bool wait_policy::yield_due() noexcept {
  if (yield_skip_ == 0) return true;
  --yield_skip_;
  return false;
}

void wait_policy::yield_ended(bool satisfied) noexcept {
  if (satisfied) {
    next_yield_skip_ = 0;
    return;
  }
  next_yield_skip_ = std::min(max_yield_skip, next_yield_skip_ == 0 ? 1 : next_yield_skip_ * 2);
  yield_skip_ = next_yield_skip_;
}

}  // namespace uipc
