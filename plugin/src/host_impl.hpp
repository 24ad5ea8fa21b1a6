// The host's insides: plug-in records, the service registry (a slot per name
// known, entries published through an atomic pointer, both retired through
// grace periods), contexts, and the reaper that shuts down and unmaps what was
// unloaded once its calls have ended and its cleanups have run.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "baton.hpp"
#include "epoch.hpp"
#include "isolation.hpp"
#include "uipc/core/unique_fd.hpp"
#include "uipc/plugin/host.hpp"

namespace uipc::plugin::detail {

struct plugin_record;
class change_watch;

/// What a slot points to while a service is registered. Never changed once
/// published: a new registration publishes a new entry.
struct service_entry {
  uipc_plugin_service_fn fn = nullptr;
  void* data = nullptr;
  std::uint32_t flags = 0;
  plugin_record* owner = nullptr;
};

/// Not flags of the ABI: a pointer service of an isolated plug-in, listed
/// but not callable from this process; a bytes service of one, called
/// through its runner (`data` is its proxy). The fast call path takes neither.
inline constexpr std::uint32_t remote_pointer_service = 0x80000000u;
inline constexpr std::uint32_t isolated_service = 0x40000000u;
inline constexpr std::uint32_t internal_flags = remote_pointer_service | isolated_service;

/// Which services a caller may reach or see (empty: all).
using bytes_filter = std::function<bool(const service_entry&)>;

/// A service an isolated plug-in's runner lists, with the entry that calls it.
struct relayed_service {
  std::string name;
  service_entry entry;
};

/// One loaded build of a plug-in.
struct plugin_record {
  enum class phase { init, serving, retired };

  std::string name;
  std::string path;
  uipc_plugin_info info{};  // copied; fields beyond the plug-in's size are zero
  bool cooperative = true;
  baton turn;               // held by the one thread inside a cooperative plug-in
  void* library = nullptr;  // dlopen handle, or null for one linked in
  unique_fd image;          // the memfd copy it was loaded from
  uipc_plugin_entry_fn entry = nullptr;
  std::uint64_t generation = 0;
  phase stage = phase::init;
  plugin_record* predecessor = nullptr;  // the build this one replaces (reload)

  // Guarded by the registry mutex.
  std::set<std::string, std::less<>> services;
  std::vector<std::pair<uipc_plugin_service_ref*, service_entry>> staged;  // registered during init
  std::set<uipc_plugin_context*> own_contexts;                             // out-of-context ones

  // Cleanups of this build's code registered on pools of contexts it does not
  // own, not run yet: it stays mapped, and its Shutdown waits too (but at the
  // host's end), until they have run. Those on its own contexts run before it
  // is unmapped anyway (they are released first).
  std::atomic<std::size_t> cleanups_pending{0};

  std::unique_ptr<isolation> isolated;  // null for an in-process plug-in
  ~plugin_record();
};

/// A lock-free name lookup: an immutable open-addressing table, replaced
/// (copy, add, publish) when a name is added, the old one retired.
struct name_table {
  std::vector<uipc_plugin_service_ref*> buckets;  // size a power of two
  std::size_t count = 0;
  uipc_plugin_service_ref* find(std::string_view name, std::size_t hash) const noexcept;
};

std::size_t hash_name(std::string_view name) noexcept;

/// Something unpublished, freed (and for a plug-in: shut down and unmapped)
/// once the calls that could see it have ended.
struct retired {
  grace_period grace;
  std::vector<std::unique_ptr<service_entry>> entries;
  std::vector<std::unique_ptr<name_table>> tables;
  std::vector<std::unique_ptr<uipc_plugin_service_ref>> slots;  // of names no longer known
  std::shared_ptr<plugin_record> plugin;
  bool shut_down = false;  // the plug-in's Shutdown ran: only its unmapping waits

  bool empty() const noexcept {
    return entries.empty() && tables.empty() && slots.empty() && !plugin;
  }
};

struct host_impl {
  explicit host_impl(host_options options);
  ~host_impl();

  host_options options;
  pool_cache chunks;

  // The registry. `registry_mutex` guards everything below it; it is never
  // held while plug-in code runs. A name has a slot while it is registered,
  // staged or resolved (resolved: for the host's life); an unresolved slot
  // goes when its name is unregistered (forget_if_unused), so names that come
  // and go do not use max_services up. Hence a slot found by name is used
  // inside the read section it was found in; only a resolved one outlives it.
  mutable std::mutex registry_mutex;
  std::deque<std::unique_ptr<uipc_plugin_service_ref>> slots;  // stable addresses
  std::atomic<const name_table*> names{nullptr};
  std::unique_ptr<name_table> names_owner;
  std::map<std::string, std::shared_ptr<plugin_record>, std::less<>> plugins;  // serving builds
  std::set<std::string, std::less<>> loading;                                  // names being loaded
  std::vector<std::string> load_order;
  std::size_t registered = 0;

  // Contexts: recycled, with their pools. Those that were ever a plug-in's
  // own (the ones context_dispose takes) are never freed and are reused
  // oldest first, after a quarantine: a dispose of one already disposed finds
  // a context, not freed memory, and most likely one still free.
  std::mutex contexts_mutex;
  std::vector<uipc_plugin_context*> free_contexts;
  std::deque<uipc_plugin_context*> free_own_contexts;
  std::size_t contexts_alive = 0;

  // Told of every change of the registry: runners watching this host's services.
  std::mutex change_watches_mutex;
  std::vector<change_watch*> change_watches;

  // Counters.
  std::atomic<std::uint64_t> calls{0}, failed_calls{0}, reloads{0};
  std::atomic<bool> stopping{false};

  // The reaper.
  std::mutex reap_mutex;
  std::condition_variable reap_wake, reap_done;
  std::deque<retired> pending;
  std::size_t finishing = 0;  // taken from `pending`, being finished
  bool reaper_stop = false;
  std::thread reaper;

  // -- registry (registry.cpp)
  /// The slot of `name`, or null. Use it inside the caller's read section only
  /// (unless resolved): an unused one is freed after the grace period.
  uipc_plugin_service_ref* find_slot(std::string_view name) const noexcept;
  result<uipc_plugin_service_ref*> slot_for(std::string_view name);  // registry_mutex held
  /// slot_for, the slot then kept for the host's life (a service_ref holds it).
  result<uipc_plugin_service_ref*> resolve(std::string_view name);
  /// Publishes a new name table of `slots`; the old one goes to `out`
  /// (registry_mutex held).
  void publish_names(retired& out);
  /// Drops `slot` (to `out`) when no registration, staging or resolution
  /// holds it (registry_mutex held).
  void forget_if_unused(uipc_plugin_service_ref* slot, retired& out);
  int register_service(uipc_plugin_context* ctx, const char* name, uipc_plugin_service_fn fn,
                       void* data, std::uint32_t flags);
  /// Stages a service of a plug-in being loaded (registry_mutex held): published by commit().
  int stage(plugin_record& owner, std::string_view name, service_entry entry);
  int unregister(plugin_record& owner, std::string_view name,
                 std::vector<std::pair<std::string, int>>& events, retired& out);
  /// Publishes a serving plug-in's service (registry_mutex held); an entry it
  /// replaces goes to `out`.
  int publish(plugin_record& owner, std::string_view name, service_entry entry,
              std::vector<std::pair<std::string, int>>& events, retired& out);
  /// An isolated plug-in's services as its runner lists them now: new ones
  /// published, gone ones unregistered, the events told. Not under registry_mutex.
  void relay(plugin_record& owner, const std::vector<relayed_service>& now);
  std::string list() const;
  /// runner_protocol's answer to `list`: the plug-in line for `plugin`, the
  /// version, then the services `visible` lets through, with their flags
  /// (pointer services, and those of other processes, as pointer ones).
  std::string describe(std::string_view plugin, std::uint32_t flags, std::uint64_t version,
                       const bytes_filter& visible) const;
  void add_change_watch(change_watch* w);
  void remove_change_watch(change_watch* w);
  void notify(uipc_plugin_context* ctx, const plugin_record* source,
              const std::vector<std::pair<std::string, int>>& events);

  // -- calls (calls.cpp)
  int call(uipc_plugin_context* ctx, const uipc_plugin_service_ref* slot, void* arg,
           std::uint64_t* out);
  /// call() by name, looked up inside the call's read section.
  int call_named(uipc_plugin_context* ctx, std::string_view name, void* arg, std::uint64_t* out);
  int run(uipc_plugin_context* ctx, const service_entry& entry, void* arg, std::uint64_t* out);
  /// Runs `body` as plug-in `target`'s code on `ctx` (baton, yield of the caller's).
  int enter(uipc_plugin_context* ctx, plugin_record& target, const std::function<void()>& body);

  // -- contexts (contexts.cpp)
  result<uipc_plugin_context*> make_context(plugin_record* owner);
  void end_context(uipc_plugin_context* ctx);
  /// Ends the contexts `p` made and did not dispose, with a warning naming `when`.
  void release_own_contexts(plugin_record& p, std::string_view when);

  // -- lifecycle (lifecycle.cpp)
  result<std::string> load(std::shared_ptr<plugin_record> record,
                           const std::shared_ptr<plugin_record>& old);
  /// Reserves `record`'s name in `loading` (registry_mutex held): a load, a
  /// reload or an unload of the name waits for nothing and is refused meanwhile.
  /// A reload's `old` must still be the serving build: two reloads read the
  /// same one, and the second would retire it twice and drop the first's build
  /// unretired. Empty text: reserved; otherwise why not.
  std::string reserve(plugin_record& record, const std::shared_ptr<plugin_record>& old);
  /// Publishes a loaded build's staged services (its name reserved in `loading`);
  /// for a reload, takes over `old`'s names and retires it.
  result<std::string> commit(std::shared_ptr<plugin_record> record,
                             const std::shared_ptr<plugin_record>& old);
  /// Hands what the caller has just unpublished to the reaper, its grace
  /// period begun now; nothing, when there is nothing.
  void retire(retired item);
  void reap_loop();
  /// Whether `item` may be finished now: its calls have ended, and its
  /// plug-in's cleanups have run (Shutdown waits for them but at the host's
  /// end; the unmapping always does).
  bool finishable(const retired& item) const;
  /// Frees `item`; for a plug-in, runs Shutdown and unmaps it. False when
  /// only the unmapping is left, waiting for cleanups: `item` stays pending.
  bool finish(retired& item);
  void log(int level, std::string_view text) const;
};

/// Calls bytes service `name` on `ctx`: context::call_bytes, and the same
/// refusing (service_not_found) a service `callable` turns down.
result<std::span<const std::byte>> call_bytes(uipc_plugin_context* ctx, std::string_view name,
                                              std::span<const std::byte> request,
                                              std::uint64_t* value,
                                              const bytes_filter& callable = {});

/// Contexts: one request's, or one of a plug-in's own threads.
}  // namespace uipc::plugin::detail

struct uipc_plugin_service_ref {
  std::string name;
  std::size_t hash = 0;
  std::atomic<uipc::plugin::detail::service_entry*> entry{nullptr};
  // Guarded by the registry mutex: the plug-in initialising with this name staged,
  // and whether a service_ref was given out (the slot then stays).
  uipc::plugin::detail::plugin_record* staged_by = nullptr;
  bool pinned = false;
};

struct uipc_plugin_context {
  using clock = std::chrono::steady_clock;
  explicit uipc_plugin_context(uipc::plugin::detail::host_impl& h, std::size_t limit)
      : host(&h), memory(h.chunks, limit) {}

  uipc::plugin::detail::host_impl* host;
  uipc::plugin::pool memory;
  uipc::plugin::detail::plugin_record* running = nullptr;  // whose code runs with this context now
  bool holds_baton = false;  // the running (cooperative) plug-in's baton
  // Whose baton blocking_begin gave back in the running call frame (blocking_end
  // takes it again); a call saves and clears it for the callee, and restores it.
  uipc::plugin::detail::plugin_record* yielded = nullptr;
  uipc::plugin::detail::plugin_record* owner = nullptr;  // out-of-context: the plug-in that made it
  std::atomic<bool> live{false};        // made and not ended (context_dispose checks)
  bool kept = false;                    // was a plug-in's own once: never freed (see host_impl)
  std::atomic<std::uintptr_t> user{0};  // the thread using it now
  clock::time_point deadline = clock::time_point::max();
  std::uint64_t calls = 0;
  std::uint64_t failed = 0;
};
