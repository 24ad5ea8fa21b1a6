// The hot path of a call through a resolved name, flattened into its caller
// (the C ABI's call_resolved and context::call): a context that no thread
// holds, a thread outside any call, a caller holding no baton. Everything
// else (nested calls, isolated plug-ins, a busy context, no membarrier) takes
// host_impl::call.
#pragma once

#include "context_use.hpp"
#include "host_impl.hpp"

namespace uipc::plugin::detail {

/// How long a call may wait to enter a busy cooperative plug-in.
inline uipc_plugin_context::clock::time_point entry_deadline(const uipc_plugin_context* ctx) {
  if (ctx->deadline != uipc_plugin_context::clock::time_point::max()) return ctx->deadline;
  return uipc_plugin_context::clock::now() + ctx->host->options.cooperative_wait;
}

[[gnu::always_inline]] inline int call_fast(uipc_plugin_context* ctx,
                                            const uipc_plugin_service_ref* slot, void* arg,
                                            std::uint64_t* out) {
  reader_slot* reader = fast_slot;
  if (!reader || ctx->holds_baton || ctx->user.load(std::memory_order_acquire) != 0) [[unlikely]]
    return ctx->host->call(ctx, slot, arg, out);
  const std::uint64_t seq = reader->seq.load(std::memory_order_relaxed);
  if (seq & 1) [[unlikely]]
    return ctx->host->call(ctx, slot, arg, out);  // inside a call already: nested
  ctx->user.store(reinterpret_cast<std::uintptr_t>(reader),
                  std::memory_order_relaxed);  // thread_token()
  // Enter the read section (see epoch.hpp): membarrier on the writer's side
  // makes a compiler barrier enough here.
  reader->seq.store(seq + 1, std::memory_order_relaxed);
  std::atomic_signal_fence(std::memory_order_seq_cst);
  const service_entry* entry = slot->entry.load(std::memory_order_acquire);
  int status = UIPC_PLUGIN_OK;
  if (entry && !(entry->flags & internal_flags)) [[likely]] {
    plugin_record& callee = *entry->owner;
    plugin_record* caller = ctx->running;
    ctx->running = &callee;
    ++ctx->calls;
    if (!callee.cooperative) [[likely]] {
      try {
        *out = entry->fn(ctx, entry->data, arg);
      } catch (...) {
        status = UIPC_PLUGIN_E_PLUGIN_FAILED;
        ++ctx->failed;
      }
    } else if (!callee.turn.take_by([ctx] { return entry_deadline(ctx); })) [[unlikely]] {
      // The caller holds no baton (checked above): nothing to yield.
      status = UIPC_PLUGIN_E_TIMED_OUT;
      ++ctx->failed;
    } else {
      ctx->holds_baton = true;
      try {
        *out = entry->fn(ctx, entry->data, arg);
      } catch (...) {
        status = UIPC_PLUGIN_E_PLUGIN_FAILED;
        ++ctx->failed;
      }
      if (ctx->holds_baton) {  // taken back after any yield inside
        ctx->holds_baton = false;
        callee.turn.give_back();
      }
    }
    ctx->running = caller;
    reader->seq.store(seq + 2, std::memory_order_release);
    ctx->user.store(0, std::memory_order_release);
    return status;
  }
  reader->seq.store(seq + 2, std::memory_order_release);
  ctx->user.store(0, std::memory_order_release);
  if (!entry) return UIPC_PLUGIN_E_SERVICE_NOT_FOUND;
  return ctx->host->call(ctx, slot, arg, out);  // an isolated plug-in's service
}

}  // namespace uipc::plugin::detail
