// The hot path of a call through a resolved name, flattened into its caller
// (the C ABI's call_resolved and context::call): a context that no thread
// holds, a thread outside any call, a caller holding no baton. Everything
// else (nested calls, isolated plug-ins, a busy context, no membarrier) takes
// host_impl::call. A context no callback marks is in no call frame: it holds
// no baton and has no blocking window open (`yielded` is null).
#pragma once

#include "context_use.hpp"
#include "host_impl.hpp"

namespace uipc::plugin::detail {

/// How long a call may wait to enter a busy cooperative plug-in.
inline uipc_plugin_context::clock::time_point entry_deadline(const uipc_plugin_context* ctx) {
  if (ctx->deadline != uipc_plugin_context::clock::time_point::max()) return ctx->deadline;
  return uipc_plugin_context::clock::now() + ctx->host->options.cooperative_wait;
}

/// The fast path around a slot `find` gives inside the call's read section:
/// a resolved one, or one looked up by name there (an unresolved slot may be
/// freed once no section holds it). `slow` is the whole call the other way.
template <class Find, class Slow>
[[gnu::always_inline]] inline int call_fast_with(uipc_plugin_context* ctx, Find&& find, Slow&& slow,
                                                 void* arg, std::uint64_t* out) {
  reader_slot* reader = fast_slot;
  if (!reader) [[unlikely]]
    return slow();
  const std::uint64_t seq = reader->seq.load(std::memory_order_relaxed);
  if (seq & 1) [[unlikely]]
    return slow();  // inside a call already: nested
  // The context's mark (context_use.hpp): held, it is another thread's
  // (host_impl::call refuses) or an outer callback's of this one. A load and
  // a store, not a compare-exchange (a locked instruction per call): the
  // check catches a context shared between threads, not two entries racing
  // within the same few nanoseconds (see context_use.hpp).
  if (ctx->holds_baton || ctx->user.load(std::memory_order_acquire) != 0) [[unlikely]]
    return slow();
  ctx->user.store(reinterpret_cast<std::uintptr_t>(reader),
                  std::memory_order_relaxed);  // thread_token()
  // Enter the read section (see epoch.hpp): membarrier on the writer's side
  // makes a compiler barrier enough here.
  reader->seq.store(seq + 1, std::memory_order_relaxed);
  std::atomic_signal_fence(std::memory_order_seq_cst);
  const uipc_plugin_service_ref* slot = find();
  const service_entry* entry = slot ? slot->entry.load(std::memory_order_acquire) : nullptr;
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
      ctx->yielded = nullptr;  // a window the callee left open ends with its frame
    }
    ctx->running = caller;
  } else if (entry) {
    // An isolated plug-in's service, still in the section and marked (the
    // slow path nests): the slot stays valid.
    status = ctx->host->call(ctx, slot, arg, out);
  } else {
    status = UIPC_PLUGIN_E_SERVICE_NOT_FOUND;
  }
  reader->seq.store(seq + 2, std::memory_order_release);
  ctx->user.store(0, std::memory_order_release);
  return status;
}

/// A call through a resolved name.
[[gnu::always_inline]] inline int call_fast(uipc_plugin_context* ctx,
                                            const uipc_plugin_service_ref* slot, void* arg,
                                            std::uint64_t* out) {
  return call_fast_with(
      ctx, [slot] { return slot; }, [&] { return ctx->host->call(ctx, slot, arg, out); }, arg, out);
}

/// A call by name: looked up inside the call's read section.
[[gnu::always_inline]] inline int call_fast_named(uipc_plugin_context* ctx, std::string_view name,
                                                  void* arg, std::uint64_t* out) {
  return call_fast_with(
      ctx, [&] { return ctx->host->find_slot(name); },
      [&] { return ctx->host->call_named(ctx, name, arg, out); }, arg, out);
}

}  // namespace uipc::plugin::detail
