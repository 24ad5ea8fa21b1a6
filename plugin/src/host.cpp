// The host facade and the context facade over host_impl.
#include "uipc/plugin/host.hpp"

#include <algorithm>

#include "call_path.hpp"
#include "context_use.hpp"
#include "host_impl.hpp"

namespace uipc::plugin {

namespace detail {
const uipc_plugin_host_api& host_api_table() noexcept;
result<std::string> load_isolated(host_impl& host, const std::filesystem::path& path,
                                  isolation_options options,
                                  const std::shared_ptr<plugin_record>& old);
}  // namespace detail

using detail::host_impl;

// -- context ------------------------------------------------------------------

context& context::operator=(context&& other) noexcept {
  if (this != &other) {
    if (ctx_) ctx_->host->end_context(ctx_);
    ctx_ = std::exchange(other.ctx_, nullptr);
  }
  return *this;
}

context::~context() {
  if (ctx_) ctx_->host->end_context(ctx_);
}

pool& context::memory() noexcept { return ctx_->memory; }

void context::set_deadline(clock::time_point deadline) noexcept { ctx_->deadline = deadline; }

result<std::uint64_t> context::call(const service_ref& ref, void* arg) {
  if (!ctx_ || !ref) return errc::invalid_argument;
  std::uint64_t out = 0;
  if (int status = detail::call_fast(ctx_, ref.get(), arg, &out); status != UIPC_PLUGIN_OK)
    return status_code(status);
  return out;
}

result<std::uint64_t> context::call(std::string_view name, void* arg) {
  if (!ctx_) return errc::invalid_argument;
  std::uint64_t out = 0;
  if (int status = detail::call_fast_named(ctx_, name, arg, &out); status != UIPC_PLUGIN_OK)
    return status_code(status);
  return out;
}

result<std::span<const std::byte>> context::call_bytes(std::string_view name,
                                                       std::span<const std::byte> request,
                                                       std::uint64_t* value) {
  if (!ctx_) return errc::invalid_argument;
  return detail::call_bytes(ctx_, name, request, value);
}

namespace detail {

result<std::span<const std::byte>> call_bytes(uipc_plugin_context* ctx, std::string_view name,
                                              std::span<const std::byte> request,
                                              std::uint64_t* value, const bytes_filter& callable) {
  uipc_plugin_bytes_call call{
      sizeof(uipc_plugin_bytes_call), 0, request.data(), request.size(), nullptr, 0};
  int status;
  {
    context_use use(ctx);
    if (use.busy()) return errc::context_busy;
    read_section section;  // the slot is used inside the section it was found in
    const uipc_plugin_service_ref* slot = ctx->host->find_slot(name);
    if (!slot) return errc::service_not_found;
    const service_entry* entry = slot->entry.load(std::memory_order_acquire);
    if (!entry || (callable && !callable(*entry))) return errc::service_not_found;
    if (!(entry->flags & UIPC_PLUGIN_SERVICE_BYTES)) return errc::service_not_compatible;
    std::uint64_t ignored;
    status = ctx->host->run(ctx, *entry, &call, value ? value : &ignored);
  }
  if (status != UIPC_PLUGIN_OK) return status_code(status);
  return std::span<const std::byte>(static_cast<const std::byte*>(call.out),
                                    call.out ? call.out_size : 0);
}

}  // namespace detail

// -- host ---------------------------------------------------------------------

host::host(std::unique_ptr<host_impl> impl) : impl_(std::move(impl)) {}

result<std::unique_ptr<host>> host::create(host_options options) {
  if (options.max_services == 0 || options.max_contexts == 0) return errc::invalid_argument;
  return std::unique_ptr<host>(new host(std::make_unique<host_impl>(std::move(options))));
}

host::~host() {
  // Newest first: a plug-in may use the services of those loaded before it.
  std::vector<std::string> order;
  {
    std::lock_guard lock(impl_->registry_mutex);
    order = impl_->load_order;
  }
  for (auto it = order.rbegin(); it != order.rend(); ++it) (void)unload(*it);
  impl_->stopping.store(true);
  (void)quiesce(std::chrono::milliseconds::max());
}

result<std::string> host::load(const std::filesystem::path& shared_object) {
  auto record = std::make_shared<detail::plugin_record>();
  record->path = std::filesystem::absolute(shared_object).string();
  return impl_->load(std::move(record), nullptr);
}

result<std::string> host::load(uipc_plugin_entry_fn entry) {
  if (!entry) return errc::invalid_argument;
  auto record = std::make_shared<detail::plugin_record>();
  record->entry = entry;
  return impl_->load(std::move(record), nullptr);
}

error_code host::reload(std::string_view name, const std::filesystem::path& shared_object) {
  std::shared_ptr<detail::plugin_record> old;
  {
    std::lock_guard lock(impl_->registry_mutex);
    auto it = impl_->plugins.find(name);
    if (it == impl_->plugins.end()) return errc::plugin_not_found;
    old = it->second;
  }
  if (old->isolated) {
    // A new runner for the new build, started as the old one was.
    auto loaded = detail::load_isolated(
        *impl_, shared_object.empty() ? std::filesystem::path(old->path) : shared_object,
        old->isolated->options(), old);
    return loaded ? error_code() : loaded.error();
  }
  auto record = std::make_shared<detail::plugin_record>();
  record->path =
      shared_object.empty() ? old->path : std::filesystem::absolute(shared_object).string();
  record->entry = record->path.empty() ? old->entry : nullptr;
  auto loaded = impl_->load(std::move(record), old);
  return loaded ? error_code() : loaded.error();
}

error_code host::unload(std::string_view name) {
  std::vector<std::pair<std::string, int>> events;
  detail::retired out;
  std::shared_ptr<detail::plugin_record> record;
  {
    std::lock_guard lock(impl_->registry_mutex);
    auto it = impl_->plugins.find(name);
    if (it == impl_->plugins.end()) return errc::plugin_not_found;
    // A reload under way holds the serving build as its `old`: it retires it.
    if (impl_->loading.count(name)) return errc::duplicate_plugin;
    record = it->second;
    for (const auto& service : std::set<std::string, std::less<>>(record->services))
      impl_->unregister(*record, service, events, out);
    record->stage = detail::plugin_record::phase::retired;
    impl_->plugins.erase(it);
    std::erase(impl_->load_order, record->name);
    out.plugin = record;
  }
  impl_->retire(std::move(out));
  impl_->notify(nullptr, record.get(), events);
  return {};
}

result<context> host::new_context() {
  if (impl_->stopping.load(std::memory_order_relaxed)) return errc::stopped;
  auto made = impl_->make_context(nullptr);
  if (!made) return made.error();
  return context(*made);
}

result<service_ref> host::resolve(std::string_view name) {
  auto slot = impl_->resolve(name);
  if (!slot) return slot.error();
  return service_ref(*slot);
}

std::string host::list_services() const { return impl_->list(); }

result<std::uint32_t> host::service_flags(std::string_view name) const {
  std::lock_guard lock(impl_->registry_mutex);
  auto* slot =
      impl_->names_owner ? impl_->names_owner->find(name, detail::hash_name(name)) : nullptr;
  const detail::service_entry* entry = slot ? slot->entry.load(std::memory_order_relaxed) : nullptr;
  if (!entry) return errc::service_not_found;
  return entry->flags & UIPC_PLUGIN_SERVICE_BYTES;
}

result<std::string> host::load_isolated(const std::filesystem::path& shared_object,
                                        isolation_options options) {
  return detail::load_isolated(*impl_, shared_object, std::move(options), nullptr);
}

std::vector<plugin_status> host::plugins() const {
  std::vector<plugin_status> out;
  std::lock_guard lock(impl_->registry_mutex);
  for (const auto& name : impl_->load_order) {
    auto it = impl_->plugins.find(name);
    if (it == impl_->plugins.end()) continue;
    const auto& p = *it->second;
    plugin_status s;
    s.name = p.name;
    s.path = p.path;
    s.preemptive = !p.cooperative;
    s.isolated = p.isolated != nullptr;
    s.abi_major = p.info.abi_major;
    s.abi_minor = p.info.abi_minor;
    s.generation = p.generation;
    s.state = "running";
    if (p.isolated) p.isolated->status(s.state, s.crashes, s.last_error);
    s.services.assign(p.services.begin(), p.services.end());
    out.push_back(std::move(s));
  }
  return out;
}

host_stats host::stats() const {
  host_stats s;
  s.calls = impl_->calls.load(std::memory_order_relaxed);
  s.failed_calls = impl_->failed_calls.load(std::memory_order_relaxed);
  s.reloads = impl_->reloads.load(std::memory_order_relaxed);
  {
    std::lock_guard lock(impl_->contexts_mutex);
    s.contexts_alive = impl_->contexts_alive;
  }
  {
    std::lock_guard lock(impl_->reap_mutex);
    s.retired_pending = impl_->pending.size() + impl_->finishing;
  }
  s.pool_bytes_cached = impl_->chunks.bytes_cached();
  return s;
}

error_code host::quiesce(std::chrono::milliseconds timeout) {
  std::unique_lock lock(impl_->reap_mutex);
  auto done = [&] { return impl_->pending.empty() && impl_->finishing == 0; };
  if (timeout == std::chrono::milliseconds::max()) {
    impl_->reap_done.wait(lock, done);
    return {};
  }
  return impl_->reap_done.wait_for(lock, timeout, done) ? error_code()
                                                        : make_error_code(errc::timed_out);
}

const uipc_plugin_host_api& host::api() noexcept { return detail::host_api_table(); }

}  // namespace uipc::plugin
