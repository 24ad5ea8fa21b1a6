// Calls into plug-ins: the hot path through a resolved name, the bridging of
// cooperative and preemptive plug-ins, and the C ABI callbacks.
#include <poll.h>

#include <cstring>
#include <new>
#include <utility>

#include "call_path.hpp"
#include "context_use.hpp"
#include "host_impl.hpp"

namespace uipc::plugin::detail {
namespace {

// What a context ran before a call switched it to the callee; restored after.
// The yield state is the frame's own: a callee's blocking_begin/blocking_end
// pair neither sees nor ends the window of a caller that called it from
// inside one (and takes no baton but the callee's).
struct caller_frame {
  plugin_record* running;
  bool held_baton;
  plugin_record* yielded;
};

// Yield point: the caller's cooperative plug-in lets another thread in.
caller_frame yield(uipc_plugin_context* ctx) noexcept {
  caller_frame frame{ctx->running, ctx->holds_baton, ctx->yielded};
  ctx->yielded = nullptr;
  if (frame.held_baton) {
    ctx->holds_baton = false;
    frame.running->turn.give_back();
  }
  return frame;
}

// Back from the yield: the caller waits for its plug-in's baton (no deadline:
// its own code is on this thread's stack and must get back in).
void resume(uipc_plugin_context* ctx, caller_frame frame) noexcept {
  ctx->running = frame.running;
  ctx->yielded = frame.yielded;
  if (frame.held_baton) {
    frame.running->turn.take(uipc_plugin_context::clock::time_point::max());
    ctx->holds_baton = true;
  }
}

}  // namespace

int host_impl::run(uipc_plugin_context* ctx, const service_entry& entry, void* arg,
                   std::uint64_t* out) {
  if (entry.flags & internal_flags) [[unlikely]] {
    if (entry.flags & remote_pointer_service) return UIPC_PLUGIN_E_SERVICE_NOT_COMPATIBLE;
    // An isolated plug-in's service: a caps call, which waits; the caller's
    // cooperative plug-in lets another thread in meanwhile.
    ++ctx->calls;
    caller_frame frame = yield(ctx);
    int status = static_cast<isolation_proxy*>(entry.data)->call(ctx, arg, out);
    if (status != UIPC_PLUGIN_OK) ++ctx->failed;
    resume(ctx, frame);
    return status;
  }
  plugin_record& callee = *entry.owner;
  ++ctx->calls;
  // The common case first: a preemptive callee, and a caller holding no baton.
  if (!callee.cooperative && !ctx->holds_baton) [[likely]] {
    plugin_record* caller = ctx->running;
    plugin_record* caller_yielded = std::exchange(ctx->yielded, nullptr);
    ctx->running = &callee;
    int status = UIPC_PLUGIN_OK;
    try {
      *out = entry.fn(ctx, entry.data, arg);
    } catch (...) {
      status = UIPC_PLUGIN_E_PLUGIN_FAILED;
      ++ctx->failed;
    }
    ctx->running = caller;
    ctx->yielded = caller_yielded;
    return status;
  }
  caller_frame frame = yield(ctx);
  if (callee.cooperative && !callee.turn.take_by([ctx] { return entry_deadline(ctx); })) {
    resume(ctx, frame);
    ++ctx->failed;
    return UIPC_PLUGIN_E_TIMED_OUT;
  }
  ctx->running = &callee;
  ctx->holds_baton = callee.cooperative;
  int status = UIPC_PLUGIN_OK;
  try {
    *out = entry.fn(ctx, entry.data, arg);
  } catch (...) {
    status = UIPC_PLUGIN_E_PLUGIN_FAILED;
    ++ctx->failed;
  }
  if (ctx->holds_baton) {
    ctx->holds_baton = false;
    callee.turn.give_back();
  }
  resume(ctx, frame);
  return status;
}

int host_impl::call(uipc_plugin_context* ctx, const uipc_plugin_service_ref* slot, void* arg,
                    std::uint64_t* out) {
  context_use use(ctx);
  if (use.busy()) [[unlikely]]
    return UIPC_PLUGIN_E_CONTEXT_BUSY;
  read_section section;
  const service_entry* entry = slot->entry.load(std::memory_order_acquire);
  if (!entry) [[unlikely]]
    return UIPC_PLUGIN_E_SERVICE_NOT_FOUND;
  return run(ctx, *entry, arg, out);
}

int host_impl::call_named(uipc_plugin_context* ctx, std::string_view name, void* arg,
                          std::uint64_t* out) {
  context_use use(ctx);
  if (use.busy()) [[unlikely]]
    return UIPC_PLUGIN_E_CONTEXT_BUSY;
  read_section section;  // an unresolved slot is used inside the section it was found in
  const uipc_plugin_service_ref* slot = find_slot(name);
  const service_entry* entry = slot ? slot->entry.load(std::memory_order_acquire) : nullptr;
  if (!entry) [[unlikely]]
    return UIPC_PLUGIN_E_SERVICE_NOT_FOUND;
  return run(ctx, *entry, arg, out);
}

int host_impl::enter(uipc_plugin_context* ctx, plugin_record& target,
                     const std::function<void()>& body) {
  context_use use(ctx);
  if (use.busy()) return UIPC_PLUGIN_E_CONTEXT_BUSY;
  caller_frame frame = yield(ctx);
  if (target.cooperative && !target.turn.take_by([ctx] { return entry_deadline(ctx); })) {
    resume(ctx, frame);
    return UIPC_PLUGIN_E_TIMED_OUT;
  }
  ctx->running = &target;
  ctx->holds_baton = target.cooperative;
  int status = UIPC_PLUGIN_OK;
  try {
    body();
  } catch (...) {
    status = UIPC_PLUGIN_E_PLUGIN_FAILED;
  }
  if (ctx->holds_baton) {
    ctx->holds_baton = false;
    target.turn.give_back();
  }
  resume(ctx, frame);
  return status;
}

namespace {

// -- the C ABI callbacks ----------------------------------------------------

pool* pool_of(uipc_plugin_pool* p) noexcept { return reinterpret_cast<pool*>(p); }
uipc_plugin_context* context_of(pool* p) noexcept {
  return static_cast<uipc_plugin_context*>(p->user());
}

int api_register_service(uipc_plugin_context* ctx, const char* name, uipc_plugin_service_fn fn,
                         void* data, std::uint32_t flags) {
  if (!ctx || !name) return UIPC_PLUGIN_E_INVALID_ARGUMENT;
  return ctx->host->register_service(ctx, name, fn, data, flags);
}

int api_resolve_service(uipc_plugin_context* ctx, const char* name,
                        const uipc_plugin_service_ref** out) {
  if (!ctx || !name || !out) return UIPC_PLUGIN_E_INVALID_ARGUMENT;
  context_use use(ctx);
  if (use.busy()) return UIPC_PLUGIN_E_CONTEXT_BUSY;
  auto slot = ctx->host->resolve(name);
  if (!slot) return slot.error().value();
  *out = *slot;
  return UIPC_PLUGIN_OK;
}

int api_call_resolved(uipc_plugin_context* ctx, const uipc_plugin_service_ref* ref, void* arg,
                      std::uint64_t* out) {
  if (!ctx || !ref) return UIPC_PLUGIN_E_INVALID_ARGUMENT;
  std::uint64_t ignored;
  return call_fast(ctx, ref, arg, out ? out : &ignored);
}

int api_call_service(uipc_plugin_context* ctx, const char* name, void* arg, std::uint64_t* out) {
  if (!ctx || !name) return UIPC_PLUGIN_E_INVALID_ARGUMENT;
  std::uint64_t ignored;
  return call_fast_named(ctx, name, arg, out ? out : &ignored);
}

int api_list_services(uipc_plugin_context* ctx, char** out, std::size_t* length) {
  if (!ctx || !out) return UIPC_PLUGIN_E_INVALID_ARGUMENT;
  context_use use(ctx);
  if (use.busy()) return UIPC_PLUGIN_E_CONTEXT_BUSY;
  std::string list = ctx->host->list();
  void* block = nullptr;
  if (int status = ctx->memory.allocate(list.size() + 1, &block); status != UIPC_PLUGIN_OK)
    return status;
  std::memcpy(block, list.c_str(), list.size() + 1);
  *out = static_cast<char*>(block);
  if (length) *length = list.size();
  return UIPC_PLUGIN_OK;
}

uipc_plugin_pool* api_context_pool(uipc_plugin_context* ctx) {
  return ctx ? reinterpret_cast<uipc_plugin_pool*>(&ctx->memory) : nullptr;
}

int api_pool_alloc(uipc_plugin_pool* p, std::size_t size, void** out) {
  if (!p || !out) [[unlikely]]
    return UIPC_PLUGIN_E_INVALID_ARGUMENT;
  context_use use(context_of(pool_of(p)));
  if (use.busy()) [[unlikely]]
    return UIPC_PLUGIN_E_CONTEXT_BUSY;
  return pool_of(p)->allocate(size, out);
}

int api_pool_realloc(uipc_plugin_pool* p, void* block, std::size_t size, void** out) {
  if (!p || !out) return UIPC_PLUGIN_E_INVALID_ARGUMENT;
  context_use use(context_of(pool_of(p)));
  if (use.busy()) [[unlikely]]
    return UIPC_PLUGIN_E_CONTEXT_BUSY;
  return pool_of(p)->reallocate(block, size, out);
}

int api_pool_free(uipc_plugin_pool* p, void* block) {
  if (!p) return UIPC_PLUGIN_E_INVALID_ARGUMENT;
  context_use use(context_of(pool_of(p)));
  if (use.busy()) [[unlikely]]
    return UIPC_PLUGIN_E_CONTEXT_BUSY;
  return pool_of(p)->free(block);
}

int api_pool_create_sub(uipc_plugin_pool* parent, uipc_plugin_pool** out) {
  if (!parent || !out) return UIPC_PLUGIN_E_INVALID_ARGUMENT;
  context_use use(context_of(pool_of(parent)));
  if (use.busy()) return UIPC_PLUGIN_E_CONTEXT_BUSY;
  pool* sub = nullptr;
  if (int status = pool_of(parent)->create_sub(&sub); status != UIPC_PLUGIN_OK) return status;
  sub->set_user(pool_of(parent)->user());
  *out = reinterpret_cast<uipc_plugin_pool*>(sub);
  return UIPC_PLUGIN_OK;
}

int api_pool_destroy_sub(uipc_plugin_pool* p) {
  if (!p) return UIPC_PLUGIN_E_INVALID_ARGUMENT;
  auto* ctx = context_of(pool_of(p));
  context_use use(ctx);
  if (use.busy()) return UIPC_PLUGIN_E_CONTEXT_BUSY;
  pool* parent = pool_of(p)->parent();
  if (!parent) return UIPC_PLUGIN_E_INVALID_ARGUMENT;  // the context's own pool ends with it
  return parent->destroy_sub(pool_of(p));
}

// A cleanup of a plug-in build's code on a pool of a context the build does
// not own: the build stays mapped until it has run (plugin_record::
// cleanups_pending). The record outlives it: the reaper keeps it till then.
struct owned_cleanup {
  void (*fn)(void*);
  void* data;
  plugin_record* by;
  uipc_plugin_context* ctx;  // whose pool holds it
};

void run_owned_cleanup(void* p) {
  auto* cleanup = static_cast<owned_cleanup*>(p);
  plugin_record* by = cleanup->by;
  // Run as `by`'s code: a cleanup it registers from here (the ABI allows it)
  // is counted on `by` too, before this one's count goes, so the build is not
  // unmapped between the two. The context is ending: this thread alone has it.
  plugin_record* const was = cleanup->ctx->running;
  cleanup->ctx->running = by;
  cleanup->fn(cleanup->data);
  cleanup->ctx->running = was;
  delete cleanup;
  // Release: the reaper that sees zero unmaps the code that just ran. `by`
  // may be gone once this is done.
  by->cleanups_pending.fetch_sub(1, std::memory_order_release);
}

int api_pool_cleanup(uipc_plugin_pool* p, void (*fn)(void*), void* data) {
  if (!p || !fn) return UIPC_PLUGIN_E_INVALID_ARGUMENT;
  auto* ctx = context_of(pool_of(p));
  context_use use(ctx);
  if (use.busy()) return UIPC_PLUGIN_E_CONTEXT_BUSY;
  // Whose code `fn` is: the plug-in running with this context, else the one
  // whose thread it is. Its own contexts are released before it is unmapped,
  // and the host's code needs nothing.
  plugin_record* by = ctx->running ? ctx->running : ctx->owner;
  if (!by || by == ctx->owner) return pool_of(p)->add_cleanup(fn, data);
  auto* cleanup = new (std::nothrow) owned_cleanup{fn, data, by, ctx};
  if (!cleanup) return UIPC_PLUGIN_E_NO_MEMORY;
  by->cleanups_pending.fetch_add(1, std::memory_order_relaxed);
  const int status = pool_of(p)->add_cleanup(run_owned_cleanup, cleanup);
  if (status != UIPC_PLUGIN_OK) {
    by->cleanups_pending.fetch_sub(1, std::memory_order_relaxed);
    delete cleanup;
  }
  return status;
}

int api_context_new(uipc_plugin_context* parent, uipc_plugin_context** out) {
  if (!out) return UIPC_PLUGIN_E_INVALID_ARGUMENT;
  if (!parent) return UIPC_PLUGIN_E_INVALID_ARGUMENT;  // the host must know whose thread it is
  // Thread-safe by design: reads only what the parent's plug-in fixed at load.
  plugin_record* owner = parent->running ? parent->running : parent->owner;
  if (!owner) return UIPC_PLUGIN_E_INVALID_ARGUMENT;
  auto made = parent->host->make_context(owner);
  if (!made) return made.error().value();
  *out = *made;
  return UIPC_PLUGIN_OK;
}

int api_context_dispose(uipc_plugin_context* ctx) {
  if (!ctx) return UIPC_PLUGIN_E_INVALID_ARGUMENT;
  // The mark for good: no other thread uses the context while it ends (end_context
  // clears it). Held by this thread, it is a callback further up the stack:
  // the context is in use by a call, which would go on with it ended.
  const std::uintptr_t me = thread_token();
  std::uintptr_t current = 0;
  if (!ctx->user.compare_exchange_strong(current, me, std::memory_order_acquire,
                                         std::memory_order_acquire)) {
    if (current == me)
      ctx->host->log(1, "context_dispose refused: the context is in use by a call on this thread");
    return UIPC_PLUGIN_E_CONTEXT_BUSY;
  }
  // Ended already (disposed, or released with its plug-in), or a request's
  // (ended with its request): nothing of the plug-in's to dispose.
  if (!ctx->live.load(std::memory_order_relaxed) || !ctx->owner) {
    ctx->user.store(0, std::memory_order_release);
    return UIPC_PLUGIN_E_INVALID_ARGUMENT;
  }
  ctx->host->end_context(ctx);
  return UIPC_PLUGIN_OK;
}

int api_blocking_begin(uipc_plugin_context* ctx) {
  if (!ctx) return UIPC_PLUGIN_E_INVALID_ARGUMENT;
  context_use use(ctx);
  if (use.busy()) return UIPC_PLUGIN_E_CONTEXT_BUSY;
  if (ctx->holds_baton) {
    ctx->holds_baton = false;
    ctx->yielded = ctx->running;
    ctx->running->turn.give_back();
  }
  return UIPC_PLUGIN_OK;
}

int api_blocking_end(uipc_plugin_context* ctx) {
  if (!ctx) return UIPC_PLUGIN_E_INVALID_ARGUMENT;
  context_use use(ctx);
  if (use.busy()) return UIPC_PLUGIN_E_CONTEXT_BUSY;
  // Only what this frame's blocking_begin gave back is taken again.
  if (plugin_record* given_back = std::exchange(ctx->yielded, nullptr)) {
    given_back->turn.take(uipc_plugin_context::clock::time_point::max());
    ctx->holds_baton = true;
  }
  return UIPC_PLUGIN_OK;
}

int api_wait_fd(uipc_plugin_context* ctx, int fd, short events, int timeout_ms, short* revents) {
  if (!ctx || fd < 0) return UIPC_PLUGIN_E_INVALID_ARGUMENT;
  context_use use(ctx);
  if (use.busy()) return UIPC_PLUGIN_E_CONTEXT_BUSY;
  // A yield point that puts back exactly what it changed: inside a
  // blocking_begin window it takes no baton back.
  const caller_frame frame = yield(ctx);
  pollfd p{fd, events, 0};
  int n;
  do {
    n = ::poll(&p, 1, timeout_ms);
  } while (n < 0 && errno == EINTR);
  resume(ctx, frame);
  if (n < 0) return UIPC_PLUGIN_E_INVALID_ARGUMENT;
  if (revents) *revents = n == 0 ? 0 : p.revents;
  return UIPC_PLUGIN_OK;
}

const char* api_status_text(int status) { return status_text(status); }

void api_log(uipc_plugin_context* ctx, int level, const char* message) {
  if (!ctx || !message) return;
  std::string text = ctx->running ? ctx->running->name + ": " + message : message;
  ctx->host->log(level, text);
}

constexpr uipc_plugin_host_api host_api{
    sizeof(uipc_plugin_host_api),
    UIPC_PLUGIN_ABI_MAJOR,
    UIPC_PLUGIN_ABI_MINOR,
    api_register_service,
    api_call_service,
    api_resolve_service,
    api_call_resolved,
    api_list_services,
    api_context_pool,
    api_pool_alloc,
    api_pool_realloc,
    api_pool_free,
    api_pool_create_sub,
    api_pool_destroy_sub,
    api_pool_cleanup,
    api_context_new,
    api_context_dispose,
    api_blocking_begin,
    api_blocking_end,
    api_wait_fd,
    api_status_text,
    api_log,
};

}  // namespace

const uipc_plugin_host_api& host_api_table() noexcept { return host_api; }

}  // namespace uipc::plugin::detail
