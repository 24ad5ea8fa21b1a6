// The service registry: names, slots, registration and unregistration, the
// TAB-delimited list, and service events for interested plug-ins.
#include <algorithm>
#include <cstring>

#include "change_watch.hpp"
#include "context_use.hpp"
#include "host_impl.hpp"
#include "names.hpp"

namespace uipc::plugin::detail {
namespace {

using event_list = std::vector<std::pair<std::string, int>>;

std::uint64_t load64(const char* p) noexcept {
  std::uint64_t w;
  std::memcpy(&w, p, sizeof w);
  return w;
}

std::uint64_t load32(const char* p) noexcept {
  std::uint32_t w;
  std::memcpy(&w, p, sizeof w);
  return w;
}

}  // namespace

// Eight bytes a step, one multiply each (a byte-wise FNV-1a paid a dependent
// multiply per byte: most of a call by name). The last 1 to 8 bytes are read
// with overlapping loads, never past the name. After each multiply the high
// half is folded into the low one, whose bits index the table.
std::size_t hash_name(std::string_view name) noexcept {
  constexpr std::uint64_t k = 0x9e3779b97f4a7c15ull;
  const char* p = name.data();
  std::size_t n = name.size();
  std::uint64_t h = (n + 1) * k;
  auto mix = [&h](std::uint64_t w) {
    h = (h ^ w) * k;
    h ^= h >> 32;
  };
  for (; n > 8; p += 8, n -= 8) mix(load64(p));
  if (n == 8) {
    mix(load64(p));
  } else if (n >= 4) {
    mix(load32(p) << 32 | load32(p + n - 4));
  } else if (n > 0) {
    const auto byte = [p](std::size_t i) {
      return std::uint64_t{static_cast<unsigned char>(p[i])};
    };
    mix(byte(0) << 16 | byte(n / 2) << 8 | byte(n - 1));
  }
  return static_cast<std::size_t>(h);
}

uipc_plugin_service_ref* name_table::find(std::string_view name, std::size_t hash) const noexcept {
  const std::size_t mask = buckets.size() - 1;
  for (std::size_t i = hash & mask;; i = (i + 1) & mask) {
    uipc_plugin_service_ref* slot = buckets[i];
    if (!slot) return nullptr;
    if (slot->hash == hash && slot->name == name) return slot;
  }
}

uipc_plugin_service_ref* host_impl::find_slot(std::string_view name) const noexcept {
  const name_table* table = names.load(std::memory_order_acquire);
  return table ? table->find(name, hash_name(name)) : nullptr;
}

void host_impl::publish_names(retired& out) {
  // A new table with room to spare (at most half full), published whole.
  auto table = std::make_unique<name_table>();
  std::size_t size = 16;
  while (size < 2 * slots.size()) size *= 2;
  table->buckets.assign(size, nullptr);
  for (auto& s : slots)
    for (std::size_t i = s->hash & (size - 1);; i = (i + 1) & (size - 1))
      if (!table->buckets[i]) {
        table->buckets[i] = s.get();
        break;
      }
  table->count = slots.size();
  names.store(table.get(), std::memory_order_release);
  if (names_owner) out.tables.push_back(std::move(names_owner));
  names_owner = std::move(table);
}

result<uipc_plugin_service_ref*> host_impl::slot_for(std::string_view name) {
  if (!valid_service_name(name)) return errc::invalid_name;
  const std::size_t hash = hash_name(name);
  if (names_owner)
    if (auto* slot = names_owner->find(name, hash)) return slot;
  if (slots.size() >= options.max_services) return errc::too_many;
  auto slot = std::make_unique<uipc_plugin_service_ref>();
  slot->name = std::string(name);
  slot->hash = hash;
  slots.push_back(std::move(slot));
  retired old;
  publish_names(old);
  retire(std::move(old));
  return slots.back().get();
}

result<uipc_plugin_service_ref*> host_impl::resolve(std::string_view name) {
  std::lock_guard lock(registry_mutex);
  auto slot = slot_for(name);
  if (slot) (*slot)->pinned = true;
  return slot;
}

void host_impl::forget_if_unused(uipc_plugin_service_ref* slot, retired& out) {
  if (slot->pinned || slot->staged_by || slot->entry.load(std::memory_order_relaxed)) return;
  auto it = std::find_if(slots.begin(), slots.end(), [&](auto& s) { return s.get() == slot; });
  if (it == slots.end()) return;
  out.slots.push_back(std::move(*it));
  slots.erase(it);
  publish_names(out);  // without it; a call that found it ends before it is freed
}

int host_impl::stage(plugin_record& owner, std::string_view name, service_entry entry) {
  auto slot = slot_for(name);
  if (!slot) return slot.error().value();
  service_entry* current = (*slot)->entry.load(std::memory_order_relaxed);
  if ((current && current->owner != owner.predecessor) ||
      ((*slot)->staged_by && (*slot)->staged_by != &owner))
    return UIPC_PLUGIN_E_DUPLICATE_SERVICE;
  (*slot)->staged_by = &owner;
  entry.owner = &owner;
  auto& staged = owner.staged;
  auto it = std::find_if(staged.begin(), staged.end(), [&](auto& s) { return s.first == *slot; });
  if (it != staged.end())
    it->second = entry;
  else
    staged.emplace_back(*slot, entry);
  return UIPC_PLUGIN_OK;
}

int host_impl::unregister(plugin_record& owner, std::string_view name, event_list& events,
                          retired& out) {
  uipc_plugin_service_ref* slot = names_owner ? names_owner->find(name, hash_name(name)) : nullptr;
  if (!slot) return UIPC_PLUGIN_E_SERVICE_NOT_FOUND;
  service_entry* current = slot->entry.load(std::memory_order_relaxed);
  if (!current) return UIPC_PLUGIN_E_SERVICE_NOT_FOUND;
  if (current->owner != &owner) return UIPC_PLUGIN_E_NOT_OWNER;
  slot->entry.store(nullptr, std::memory_order_release);
  owner.services.erase(slot->name);
  --registered;
  out.entries.emplace_back(current);
  events.emplace_back(slot->name, UIPC_PLUGIN_SERVICE_REMOVED);
  forget_if_unused(slot, out);
  return UIPC_PLUGIN_OK;
}

int host_impl::publish(plugin_record& owner, std::string_view name, service_entry entry,
                       event_list& events, retired& out) {
  auto slot = slot_for(name);
  if (!slot) return slot.error().value();
  service_entry* current = (*slot)->entry.load(std::memory_order_relaxed);
  if ((current && current->owner != &owner) || ((*slot)->staged_by && (*slot)->staged_by != &owner))
    return UIPC_PLUGIN_E_DUPLICATE_SERVICE;
  entry.owner = &owner;
  (*slot)->entry.store(new service_entry(entry), std::memory_order_release);
  if (current) {
    out.entries.emplace_back(current);
  } else {
    ++registered;
    owner.services.emplace(name);
  }
  events.emplace_back(std::string(name),
                      current ? UIPC_PLUGIN_SERVICE_REPLACED : UIPC_PLUGIN_SERVICE_ADDED);
  return UIPC_PLUGIN_OK;
}

void host_impl::relay(plugin_record& owner, const std::vector<relayed_service>& now) {
  event_list events;
  retired old;
  std::vector<std::string> refused;
  if (stopping.load(std::memory_order_relaxed)) return;
  {
    std::lock_guard lock(registry_mutex);
    if (stopping.load(std::memory_order_relaxed) || owner.stage != plugin_record::phase::serving)
      return;  // a build replaced or unloaded meanwhile: its successor lists its own
    std::vector<std::string> gone;
    for (const auto& name : owner.services) {
      if (std::none_of(now.begin(), now.end(), [&](const auto& s) { return s.name == name; }))
        gone.push_back(name);
    }
    for (const auto& name : gone) (void)unregister(owner, name, events, old);
    for (const auto& s : now) {
      if (owner.services.count(s.name)) continue;  // kept as it was
      if (!valid_service_name(s.name) ||
          publish(owner, s.name, s.entry, events, old) != UIPC_PLUGIN_OK)
        refused.push_back(s.name);
    }
  }
  retire(std::move(old));
  for (const auto& name : refused)
    log(1, owner.name + ": service " + name + " not registered here (invalid or taken)");
  notify(nullptr, &owner, events);
}

int host_impl::register_service(uipc_plugin_context* ctx, const char* raw_name,
                                uipc_plugin_service_fn fn, void* data, std::uint32_t flags) {
  context_use use(ctx);
  if (use.busy()) return UIPC_PLUGIN_E_CONTEXT_BUSY;
  plugin_record* owner = ctx->running ? ctx->running : ctx->owner;
  if (!owner) return UIPC_PLUGIN_E_INVALID_ARGUMENT;  // the host's own contexts serve no services
  const std::string_view name(raw_name, ::strnlen(raw_name, 64));
  if (!valid_service_name(name)) return UIPC_PLUGIN_E_INVALID_NAME;
  if (flags & ~UIPC_PLUGIN_SERVICE_BYTES) return UIPC_PLUGIN_E_INVALID_ARGUMENT;

  event_list events;
  retired old;
  int status;
  {
    std::lock_guard lock(registry_mutex);
    if (stopping.load(std::memory_order_relaxed)) return UIPC_PLUGIN_E_STOPPED;
    if (owner->stage == plugin_record::phase::retired) return UIPC_PLUGIN_E_STOPPED;
    if (owner->stage == plugin_record::phase::init) {
      // Staged: visible when Init has returned (lifecycle.cpp publishes them).
      auto& staged = owner->staged;
      auto it = std::find_if(staged.begin(), staged.end(),
                             [&](auto& s) { return s.first->name == name; });
      if (fn) return stage(*owner, name, service_entry{fn, data, flags, owner});
      if (it == staged.end()) return UIPC_PLUGIN_E_SERVICE_NOT_FOUND;
      uipc_plugin_service_ref* slot = it->first;
      slot->staged_by = nullptr;
      staged.erase(it);
      forget_if_unused(slot, old);
      status = UIPC_PLUGIN_OK;
    } else {
      status = fn ? publish(*owner, name, service_entry{fn, data, flags, owner}, events, old)
                  : unregister(*owner, name, events, old);
    }
  }
  retire(std::move(old));
  if (status != UIPC_PLUGIN_OK) return status;
  notify(ctx, owner, events);
  return UIPC_PLUGIN_OK;
}

std::string host_impl::list() const {
  std::vector<std::string> names_now;
  {
    std::lock_guard lock(registry_mutex);
    for (const auto& slot : slots)
      if (slot->entry.load(std::memory_order_relaxed)) names_now.push_back(slot->name);
  }
  std::sort(names_now.begin(), names_now.end());
  std::string out;
  for (const auto& n : names_now) {
    if (!out.empty()) out += '\t';
    out += n;
  }
  return out;
}

std::string host_impl::describe(std::string_view plugin, std::uint32_t flags, std::uint64_t version,
                                const bytes_filter& visible) const {
  // The version first: a change while listing makes the next watch return at
  // once, so the watcher lists again.
  std::string out = "version\t" + std::to_string(version) + "\t0\n";
  out += "plugin\t";
  out += plugin;
  out += "\t" + std::to_string(flags) + "\n";
  std::lock_guard lock(registry_mutex);
  for (const auto& slot : slots) {
    const service_entry* entry = slot->entry.load(std::memory_order_relaxed);
    if (!entry || (visible && !visible(*entry))) continue;
    const std::uint32_t crossing =
        (entry->flags & remote_pointer_service) ? 0 : entry->flags & UIPC_PLUGIN_SERVICE_BYTES;
    out += "service\t" + slot->name + "\t" + std::to_string(crossing) + "\n";
  }
  return out;
}

void host_impl::add_change_watch(change_watch* w) {
  std::lock_guard lock(change_watches_mutex);
  change_watches.push_back(w);
}

void host_impl::remove_change_watch(change_watch* w) {
  std::lock_guard lock(change_watches_mutex);
  std::erase(change_watches, w);
}

void host_impl::notify(uipc_plugin_context* ctx, const plugin_record* source,
                       const event_list& events) {
  if (events.empty()) return;
  {
    std::lock_guard lock(change_watches_mutex);  // answers caps watches: no plug-in code
    for (auto* w : change_watches) w->changed();
  }
  read_section section;  // a listener unloaded meanwhile stays mapped until we are done
  std::vector<std::shared_ptr<plugin_record>> listeners;
  {
    std::lock_guard lock(registry_mutex);
    for (const auto& [name, record] : plugins)
      if (record.get() != source && record->info.service_event &&
          record->stage == plugin_record::phase::serving)
        listeners.push_back(record);
  }
  if (listeners.empty()) return;
  // The caller's context when there is one (a registration is a yield point),
  // else one of the host's own for the duration.
  uipc_plugin_context* own = nullptr;
  if (!ctx) {
    auto made = make_context(nullptr);
    if (!made) return;
    ctx = own = *made;
  }
  for (auto& listener : listeners)
    for (const auto& [name, event] : events)
      enter(ctx, *listener, [&] { listener->info.service_event(ctx, name.c_str(), event); });
  if (own) end_context(own);
}

}  // namespace uipc::plugin::detail
