// Contexts: made for requests and for plug-ins' own threads, recycled with
// their pools so that memory stays flat under load.
#include "host_impl.hpp"

namespace uipc::plugin::detail {

namespace {
// Recycled contexts whose pools keep a chunk (64 KiB) for the next request.
constexpr std::size_t kept_chunks = 64;
}  // namespace

result<uipc_plugin_context*> host_impl::make_context(plugin_record* owner) {
  uipc_plugin_context* ctx = nullptr;
  {
    std::lock_guard lock(contexts_mutex);
    if (contexts_alive >= options.max_contexts) return errc::too_many;
    ++contexts_alive;
    if (!free_contexts.empty()) {
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
    std::lock_guard lock(registry_mutex);
    owner->own_contexts.insert(ctx);
  }
  return ctx;
}

void host_impl::end_context(uipc_plugin_context* ctx) {
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
  ctx->holds_baton = ctx->yielded = false;
  ctx->deadline = uipc_plugin_context::clock::time_point::max();
  ctx->user.store(0, std::memory_order_relaxed);
  std::lock_guard lock(contexts_mutex);
  --contexts_alive;
  // Keep a bounded number for reuse, the first few with a chunk of memory
  // each; the rest go back to the system.
  if (free_contexts.size() < 1024) {
    if (free_contexts.size() >= kept_chunks) ctx->memory.trim();
    free_contexts.push_back(ctx);
    return;
  }
  delete ctx;
}

}  // namespace uipc::plugin::detail
