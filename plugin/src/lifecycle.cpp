// Plug-in lifecycle: loading a shared object (copied into a sealed memfd
// first, so that a build replaced in place can neither crash us nor be
// mistaken by the dynamic loader for the one already mapped), Register and
// Init, publishing the services Init registered, and the reaper that shuts
// down and unmaps retired builds once their calls have ended.
#include <dlfcn.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>

#include "host_impl.hpp"
#include "isolation.hpp"
#include "names.hpp"
#include "uipc/core/unique_fd.hpp"

namespace uipc::plugin::detail {

const uipc_plugin_host_api& host_api_table() noexcept;

plugin_record::~plugin_record() = default;

namespace {

// dlopen and dlclose one at a time. glibc orders them with a lock of its own;
// this one makes the order visible to ThreadSanitizer, which otherwise sees a
// new build's statics, mapped where an unloaded build's were, written with no
// order against the old build's destructors run by the reaper thread. Only
// the host calls these, so a plug-in's constructors cannot take it twice.
std::mutex loader_mutex;

void* open_library(const std::string& path) {
  std::lock_guard lock(loader_mutex);
  return ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
}

void close_library(void* library) {
  std::lock_guard lock(loader_mutex);
  ::dlclose(library);
}

// A name from the plug-in's description: read at most one byte past the rules.
bool valid_described_name(const char* name) {
  return name && valid_plugin_name(std::string_view(name, ::strnlen(name, max_name_length + 1)));
}

// The smallest description a plug-in may give: through `init`.
constexpr std::size_t minimal_info_size =
    offsetof(uipc_plugin_info, init) + sizeof(uipc_plugin_info::init);

// Copies the shared object into a sealed memfd and opens that. The memfd stays
// open while the object is loaded: the dynamic loader knows objects by path
// first, and a reused descriptor number would make a new build's
// /proc/self/fd/N look like the old one.
result<void*> open_library(const std::filesystem::path& path, unique_fd& copy_out,
                           std::string& why) {
  unique_fd file(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!file) {
    why = path.string() + ": " + std::strerror(errno);
    return errc::load_failed;
  }
  struct stat st {};
  if (::fstat(file.get(), &st) != 0 || !S_ISREG(st.st_mode)) {
    why = path.string() + ": not a regular file";
    return errc::load_failed;
  }
  std::string label = "uipc-plugin:" + path.filename().string();
  unique_fd copy(::memfd_create(label.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!copy) {
    why = std::string("memfd_create: ") + std::strerror(errno);
    return errc::load_failed;
  }
  off_t offset = 0;
  while (offset < st.st_size) {
    ssize_t n = ::copy_file_range(file.get(), &offset, copy.get(), nullptr, st.st_size - offset, 0);
    if (n <= 0) {
      // copy_file_range may refuse (EXDEV, ENOSYS): read and write instead.
      char buffer[65536];
      ssize_t r = ::pread(file.get(), buffer, sizeof buffer, offset);
      if (r <= 0 || ::write(copy.get(), buffer, static_cast<std::size_t>(r)) != r) {
        why = path.string() + ": copy failed";
        return errc::load_failed;
      }
      offset += r;
    }
  }
  (void)::fcntl(copy.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL);
  std::string proc = "/proc/self/fd/" + std::to_string(copy.get());
  void* library = open_library(proc);
  if (!library) {
    const char* e = ::dlerror();
    why = path.string() + ": " + (e ? e : "dlopen failed");
    return errc::load_failed;
  }
  copy_out = std::move(copy);
  return library;
}

}  // namespace

void host_impl::log(int level, std::string_view text) const {
  if (options.log) {
    options.log(level, text);
    return;
  }
  if (level <= 1)
    std::fprintf(stderr, "uipc.plugin: %.*s\n", static_cast<int>(text.size()), text.data());
}

result<std::string> host_impl::load(std::shared_ptr<plugin_record> record,
                                    const std::shared_ptr<plugin_record>& old) {
  std::string why;
  auto fail = [&](errc e, std::string text) -> result<std::string> {
    log(0, "load of " + (record->path.empty() ? std::string("a linked-in plug-in") : record->path) +
               " refused: " + text + " (" + make_error_code(e).message() + ")");
    if (record->library) close_library(record->library);
    record->library = nullptr;
    record->image.reset();
    return make_error_code(e);
  };
  if (stopping.load()) return errc::stopped;

  if (!record->path.empty()) {
    auto library = open_library(record->path, record->image, why);
    if (!library) return fail(errc::load_failed, why);
    record->library = *library;
    void* symbol = ::dlsym(record->library, UIPC_PLUGIN_ENTRY_SYMBOL);
    if (!symbol) return fail(errc::no_entry_point, "no " UIPC_PLUGIN_ENTRY_SYMBOL);
    record->entry = reinterpret_cast<uipc_plugin_entry_fn>(symbol);
  }

  // Register.
  const uipc_plugin_info* info = nullptr;
  try {
    info = record->entry(UIPC_PLUGIN_ABI_MAJOR, UIPC_PLUGIN_ABI_MINOR);
  } catch (...) {
    return fail(errc::plugin_failed, "the entry point threw");
  }
  if (!info) return fail(errc::init_failed, "the entry point refused this host");
  if (info->size < minimal_info_size) return fail(errc::abi_mismatch, "description truncated");
  if (info->abi_major != UIPC_PLUGIN_ABI_MAJOR)
    return fail(errc::abi_mismatch, "built for ABI " + std::to_string(info->abi_major) + "." +
                                        std::to_string(info->abi_minor) + ", host has " +
                                        std::to_string(UIPC_PLUGIN_ABI_MAJOR) + "." +
                                        std::to_string(UIPC_PLUGIN_ABI_MINOR));
  if (!valid_described_name(info->name))
    return fail(errc::invalid_name, "plug-in name breaks the rules");
  if (!info->init) return fail(errc::abi_mismatch, "no init function");
  std::memcpy(&record->info, info, std::min<std::size_t>(info->size, sizeof(uipc_plugin_info)));
  record->info.size =
      static_cast<std::uint32_t>(std::min<std::size_t>(info->size, sizeof(uipc_plugin_info)));
  record->name = info->name;
  record->cooperative = !(record->info.flags & UIPC_PLUGIN_PREEMPTIVE);
  if (old && old->name != record->name)
    return fail(errc::invalid_name,
                "the new build calls itself " + record->name + ", not " + old->name);

  std::string why_not;  // fail() logs, which is user code: after the registry is let go
  {
    std::lock_guard lock(registry_mutex);
    why_not = reserve(*record, old);
  }
  if (!why_not.empty()) return fail(errc::duplicate_plugin, why_not);
  auto unreserve = [&] {
    retired forgotten;  // slots made for names only this build staged
    {
      std::lock_guard lock(registry_mutex);
      loading.erase(record->name);
      for (auto& [slot, entry] : record->staged) {
        slot->staged_by = nullptr;
        forget_if_unused(slot, forgotten);
      }
      record->staged.clear();
    }
    retire(std::move(forgotten));
  };

  // Init, on this thread, inside the plug-in.
  auto made = make_context(record.get());
  if (!made) {
    unreserve();
    return fail(errc::too_many, "no context for init");
  }
  uipc_plugin_context* ctx = *made;
  int init_status = 0;
  int entered =
      enter(ctx, *record, [&] { init_status = record->info.init(ctx, &host_api_table()); });
  end_context(ctx);
  if (entered != UIPC_PLUGIN_OK || init_status != 0) {
    unreserve();
    // Contexts Init made go now, their cleanups run while the code is mapped.
    // Its code cannot have left a cleanup in a context it does not own: none
    // of its services was published, so it ran only with contexts of its own.
    release_own_contexts(*record, "by a failed Init");
    return fail(
        entered != UIPC_PLUGIN_OK ? errc::plugin_failed : errc::init_failed,
        entered != UIPC_PLUGIN_OK ? "init threw" : "init returned " + std::to_string(init_status));
  }

  return commit(std::move(record), old);
}

std::string host_impl::reserve(plugin_record& record, const std::shared_ptr<plugin_record>& old) {
  if (loading.count(record.name)) return record.name + " is being loaded or reloaded";
  auto serving = plugins.find(record.name);
  if (!old && serving != plugins.end()) return record.name + " is loaded";
  if (old && (serving == plugins.end() || serving->second != old))
    return record.name + " was reloaded or unloaded meanwhile";
  loading.insert(record.name);
  record.predecessor = old.get();
  record.generation = old ? old->generation + 1 : 0;
  return {};
}

result<std::string> host_impl::commit(std::shared_ptr<plugin_record> record,
                                      const std::shared_ptr<plugin_record>& old) {
  // Publish what Init registered; for a reload, take over the old build's names
  // and drop those the new one no longer serves.
  std::vector<std::pair<std::string, int>> events;
  retired out;
  {
    std::lock_guard lock(registry_mutex);
    loading.erase(record->name);
    for (auto& [slot, entry] : record->staged) {
      service_entry* current = slot->entry.load(std::memory_order_relaxed);
      slot->staged_by = nullptr;
      slot->entry.store(new service_entry(entry), std::memory_order_release);
      record->services.insert(slot->name);
      if (current) {
        out.entries.emplace_back(current);
        if (old) old->services.erase(slot->name);
      } else {
        ++registered;
      }
      events.emplace_back(slot->name,
                          current ? UIPC_PLUGIN_SERVICE_REPLACED : UIPC_PLUGIN_SERVICE_ADDED);
    }
    record->staged.clear();
    if (old) {
      for (const auto& name : std::set<std::string, std::less<>>(old->services))
        unregister(*old, name, events, out);
      old->stage = plugin_record::phase::retired;
      out.plugin = old;
    } else {
      load_order.push_back(record->name);
    }
    record->stage = plugin_record::phase::serving;
    plugins[record->name] = record;
  }
  retire(std::move(out));
  if (old) reloads.fetch_add(1, std::memory_order_relaxed);
  notify(nullptr, record.get(), events);
  log(2, "loaded " + record->name +
             (old ? " (generation " + std::to_string(record->generation) + ")" : ""));
  return record->name;
}

void host_impl::retire(retired item) {
  if (item.empty()) return;
  item.grace = grace_period::begin();  // after the unpublishing: see epoch.hpp
  {
    std::lock_guard lock(reap_mutex);
    pending.push_back(std::move(item));
  }
  reap_wake.notify_one();
}

bool host_impl::finishable(const retired& item) const {
  if (!item.grace.over()) return false;
  if (!item.plugin) return true;
  // A context that outlives the build's calls may hold a cleanup of its code
  // (pool_cleanup, run when the context ends): Shutdown waits for it, so that
  // Shutdown stays the plug-in's last call, and so does the unmapping. At the
  // host's end Shutdown waits no more: a context one plug-in's Shutdown would
  // end may hold another's cleanup, the other way round too.
  const bool cleaned = item.plugin->cleanups_pending.load(std::memory_order_acquire) == 0;
  return cleaned || (!item.shut_down && stopping.load(std::memory_order_relaxed));
}

bool host_impl::finish(retired& item) {
  item.entries.clear();
  item.tables.clear();
  item.slots.clear();
  if (!item.plugin) return true;
  plugin_record& p = *item.plugin;
  if (!item.shut_down) {
    item.shut_down = true;
    // Shutdown: no call of its services runs or can start now.
    if (p.info.shutdown) {
      auto made = make_context(&p);
      if (made) {
        enter(*made, p, [&] { p.info.shutdown(*made); });
        end_context(*made);
      }
    }
    // Contexts its threads forgot: their pools go back now.
    release_own_contexts(p, "at shutdown");
  }
  // Acquire: the cleanups' code ran before their count reached zero.
  if (p.cleanups_pending.load(std::memory_order_acquire) != 0) return false;
  if (p.library) {
    close_library(p.library);
    p.library = nullptr;
    p.image.reset();
  }
  item.plugin.reset();
  return true;
}

void host_impl::reap_loop() {
  std::unique_lock lock(reap_mutex);
  for (;;) {
    if (pending.empty()) {
      if (reaper_stop) return;
      reap_wake.wait(lock, [&] { return reaper_stop || !pending.empty(); });
      continue;
    }
    // Finish, in order, everything whose calls have ended.
    std::deque<retired> ready;
    for (auto it = pending.begin(); it != pending.end();) {
      if (finishable(*it)) {
        ready.push_back(std::move(*it));
        ++finishing;
        it = pending.erase(it);
      } else {
        ++it;
      }
    }
    if (!ready.empty()) {
      lock.unlock();
      std::deque<retired> waiting;  // shut down; unmapped once their cleanups ran
      for (auto& item : ready)      // plug-in code: none of our locks held
        if (!finish(item)) waiting.push_back(std::move(item));
      lock.lock();
      finishing -= ready.size();
      ready.clear();
      for (auto& item : waiting) pending.push_back(std::move(item));
      reap_done.notify_all();
      continue;
    }
    reap_wake.wait_for(lock, std::chrono::milliseconds(1));
  }
}

host_impl::host_impl(host_options opts) : options(std::move(opts)) {
  reaper = std::thread([this] { reap_loop(); });
}

host_impl::~host_impl() {
  {
    std::lock_guard lock(reap_mutex);
    reaper_stop = true;
  }
  reap_wake.notify_one();
  reaper.join();
  for (auto* ctx : free_contexts) delete ctx;
  for (auto* ctx : free_own_contexts) delete ctx;
  for (auto& slot : slots) delete slot->entry.load(std::memory_order_relaxed);
}

}  // namespace uipc::plugin::detail
