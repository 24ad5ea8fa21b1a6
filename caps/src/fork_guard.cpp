#include "fork_guard.hpp"

#include <pthread.h>

#include <atomic>

namespace uipc::caps::detail {
namespace {

std::atomic<std::uint64_t> epoch{0};

void on_fork_child() noexcept { epoch.fetch_add(1, std::memory_order_relaxed); }

}  // namespace

std::uint64_t fork_epoch() noexcept {
  static const bool installed = [] {
    return ::pthread_atfork(nullptr, nullptr, on_fork_child) == 0;
  }();
  (void)installed;
  return epoch.load(std::memory_order_relaxed);
}

}  // namespace uipc::caps::detail
