// Contexts: made for requests and for plug-ins' own threads, recycled with
// their pools so that memory stays flat under load.
#include "host_impl.hpp"

namespace uipc::plugin::detail {

namespace {
// Recycled contexts whose pools keep a chunk (64 KiB) for the next request.
constexpr std::size_t kept_chunks = 64;
// A plug-in's own context, once ended, waits behind this many others before
// it is reused: a plug-in that disposes it again meanwhile is refused.
constexpr std::size_t own_quarantine = 16;
}  // namespace

result<uipc_plugin_context*> host_impl::make_context(plugin_record* owner) {
  uipc_plugin_context* ctx = nullptr;
  {
    std::lock_guard lock(contexts_mutex);
    if (contexts_alive >= options.max_contexts) return errc::too_many;
    ++contexts_alive;
    if (owner && free_own_contexts.size() > own_quarantine) {
      ctx = free_own_contexts.front();
      free_own_contexts.pop_front();
    } else if (!free_contexts.empty()) {
      ctx = free_contexts.back();
      free_contexts.pop_back();
    }
  }
  if (!ctx) {
    ctx = new (std::nothrow) uipc_plugin_context(*this, options.request_memory_limit);
    if (!ctx) {
      std::lock_guard lock(contexts_mutex);
      --contexts_alive;
      return errc::no_memory;
    }
    ctx->memory.set_user(ctx);
  }
  ctx->owner = owner;
  if (owner) {
    ctx->kept = true;
    std::lock_guard lock(registry_mutex);
    owner->own_contexts.insert(ctx);
  }
  ctx->live.store(true, std::memory_order_relaxed);
  return ctx;
}

void host_impl::end_context(uipc_plugin_context* ctx) {
  ctx->live.store(false, std::memory_order_relaxed);  // a cleanup's context_dispose is refused
  if (ctx->owner) {
    std::lock_guard lock(registry_mutex);
    ctx->owner->own_contexts.erase(ctx);
  }
  // The pool's cleanups are user code: no lock of ours is held here.
  ctx->memory.release();
  if (ctx->calls) calls.fetch_add(ctx->calls, std::memory_order_relaxed);
  if (ctx->failed) failed_calls.fetch_add(ctx->failed, std::memory_order_relaxed);
  ctx->calls = ctx->failed = 0;
  ctx->running = nullptr;
  ctx->owner = nullptr;
  ctx->holds_baton = false;
  ctx->yielded = nullptr;
  ctx->deadline = uipc_plugin_context::clock::time_point::max();
  ctx->user.store(0, std::memory_order_release);
  std::lock_guard lock(contexts_mutex);
  --contexts_alive;
  if (ctx->kept) {
    // Never freed: a stale handle a plug-in disposes again must find a context.
    if (free_own_contexts.size() >= kept_chunks) ctx->memory.trim();
    free_own_contexts.push_back(ctx);
    return;
  }
  // Keep a bounded number for reuse, the first few with a chunk of memory
  // each; the rest go back to the system.
  if (free_contexts.size() < 1024) {
    if (free_contexts.size() >= kept_chunks) ctx->memory.trim();
    free_contexts.push_back(ctx);
    return;
  }
  delete ctx;
}

void host_impl::release_own_contexts(plugin_record& p, std::string_view when) {
  std::set<uipc_plugin_context*> leftovers;
  {
    std::lock_guard lock(registry_mutex);
    leftovers.swap(p.own_contexts);
  }
  if (leftovers.empty()) return;
  log(1, p.name + ": " + std::to_string(leftovers.size()) + " context(s) not disposed " +
             std::string(when) + "; released");
  for (auto* ctx : leftovers) {
    ctx->owner = nullptr;
    end_context(ctx);
  }
}

}  // namespace uipc::plugin::detail
