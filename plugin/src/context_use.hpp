// Detects a context used by two threads at once: each callback marks the
// context with its thread for its duration (nested callbacks of the same
// thread pass through), and a second thread finds the mark and is refused.
// A load and a store, not a compare-exchange: a locked instruction on every
// callback (every pool allocation) would cost more than the check is worth.
// Two threads entering within the same few nanoseconds can both pass; a
// context shared between threads is caught (plugin/README.md, Threading).
#pragma once

#include <atomic>
#include <cstdint>

#include "host_impl.hpp"

namespace uipc::plugin::detail {

/// A number of the calling thread, unique among live threads: its reader
/// slot's address (the call fast path has it in hand).
inline std::uintptr_t thread_token() noexcept {
  return reinterpret_cast<std::uintptr_t>(&this_thread_slot());
}

class context_use {
 public:
  explicit context_use(uipc_plugin_context* ctx) noexcept : ctx_(ctx) {
    const std::uintptr_t me = thread_token();
    const std::uintptr_t current = ctx->user.load(std::memory_order_acquire);
    if (current == me) return;  // nested: an outer callback of this thread holds the mark
    if (current != 0) {
      busy_ = true;
      return;
    }
    ctx->user.store(me, std::memory_order_relaxed);
    outer_ = true;
  }
  ~context_use() {
    if (outer_) ctx_->user.store(0, std::memory_order_release);
  }
  context_use(const context_use&) = delete;
  context_use& operator=(const context_use&) = delete;

  bool busy() const noexcept { return busy_; }

 private:
  uipc_plugin_context* ctx_;
  bool outer_ = false;
  bool busy_ = false;
};

}  // namespace uipc::plugin::detail
