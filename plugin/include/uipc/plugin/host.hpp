// The plug-in host: loads plug-ins (shared objects with the C ABI of abi.h, or
// entry functions linked in), keeps the registry of their services, and gives
// each request a context with its own memory pool.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "uipc/plugin/abi.h"
#include "uipc/plugin/error.hpp"
#include "uipc/plugin/pool.hpp"

namespace uipc::plugin {

namespace detail {
struct host_impl;
}

/// How a host runs its plug-ins.
struct host_options {
  /// Most memory one context's pool (with its sub-pools) may hold; 0: no limit.
  std::size_t request_memory_limit = std::size_t{64} << 20;
  /// Most service names known at once: registered, staged by an Init, or
  /// resolved (a resolved name keeps its slot for the host's life; another
  /// gives it back when it is unregistered).
  std::size_t max_services = 4096;
  /// Most contexts alive at once.
  std::size_t max_contexts = 65536;
  /// How long a call waits to enter a cooperative plug-in when its context has
  /// no deadline of its own; then it fails with errc::timed_out.
  std::chrono::milliseconds cooperative_wait{std::chrono::seconds(10)};
  /// Where the host's log lines go (level 0 error, 1 warning, 2 info, 3 debug);
  /// empty: errors and warnings to stderr. Called with no lock of the host held.
  std::function<void(int level, std::string_view text)> log;
};

/// What the host knows of one plug-in.
struct plugin_status {
  std::string name;
  std::string path;  ///< empty for one linked in
  bool preemptive = false;
  bool isolated = false;  ///< runs in its own process (uipc-plugin-runner)
  std::uint16_t abi_major = 0;
  std::uint16_t abi_minor = 0;
  std::uint64_t generation = 0;  ///< 0 when first loaded, +1 per reload
  std::string state;             ///< "running", "restarting", "stopped"
  std::uint32_t crashes = 0;     ///< isolated: crashes of its process
  std::string last_error;        ///< why it stopped or last restarted
  std::vector<std::string> services;
};

/// Counters of a host.
struct host_stats {
  std::uint64_t calls = 0;         ///< service calls made through a context
  std::uint64_t failed_calls = 0;  ///< calls that threw or timed out
  std::uint64_t contexts_alive = 0;
  std::uint64_t reloads = 0;
  std::uint64_t retired_pending =
      0;  ///< unloaded or replaced builds waiting for their calls to end
  std::uint64_t pool_bytes_cached = 0;
};

/// How an isolated plug-in runs (host::load_isolated).
struct isolation_options {
  /// The runner program; empty: uipc-plugin-runner beside this program, then
  /// in the install prefix, then on $PATH ($UIPC_PLUGIN_RUNNER overrides).
  std::string runner;
  /// The caps rendezvous directory of the runner's point; empty: the shared one.
  std::string directory;
  /// How long the runner may take to load the plug-in and serve.
  std::chrono::milliseconds start_timeout{std::chrono::seconds(5)};
  /// The deadline of a call whose context has none.
  std::chrono::milliseconds call_timeout{std::chrono::seconds(5)};
  /// The wait before the first restart after a crash; doubled per crash up to
  /// crash_window, and back to this once a runner served a whole crash_window
  /// without a crash.
  std::chrono::milliseconds first_backoff{100};
  /// This many crashes with no crash_window of service between them stop the
  /// plug-in for good.
  std::uint32_t max_crashes = 5;
  std::chrono::seconds crash_window{60};
  /// Called each time the plug-in's process was restarted after a crash and
  /// serves again: what the program told the plug-in through its services
  /// since it was loaded died with the old process, so tell it again here.
  /// Runs on the plug-in's supervising thread with no host lock held, and
  /// that thread watches the new process only once it returns: post longer
  /// work elsewhere. An exception it throws is logged and dropped.
  std::function<void()> on_restart;
  /// Asked before each start of the plug-in's process (the first, every
  /// restart, the new process of a reload): "NAME=VALUE" entries set in its
  /// environment over this process's own ("NAME" alone unsets it). What a plug-in reads at Init
  /// from its environment is then what the program holds now, from the first request a restarted
  /// process serves. Runs with no host lock held, on the thread starting the
  /// process, while a load_isolated() or reload() caller waits for that start.
  /// A hook that throws fails the start (errc::load_failed; the log says why).
  std::function<std::vector<std::string>()> environment;
};

class host;

/// A resolved service name: follows the name (reloads, unregistrations, new
/// registrations) for the host's life. Cheap to copy.
class service_ref {
 public:
  service_ref() = default;
  const uipc_plugin_service_ref* get() const noexcept { return ref_; }
  explicit operator bool() const noexcept { return ref_ != nullptr; }

 private:
  friend class host;
  explicit service_ref(const uipc_plugin_service_ref* ref) : ref_(ref) {}
  const uipc_plugin_service_ref* ref_ = nullptr;
};

/// One request's context: a memory pool and a deadline. Ending it (the
/// destructor) releases every block its pool gave. Used by one thread at a
/// time; may be moved between threads between calls.
class context {
 public:
  using clock = std::chrono::steady_clock;

  context() = default;
  context(context&& other) noexcept : ctx_(std::exchange(other.ctx_, nullptr)) {}
  context& operator=(context&& other) noexcept;
  ~context();

  uipc_plugin_context* get() const noexcept { return ctx_; }
  /// The context's memory.
  pool& memory() noexcept;
  /// Calls into a cooperative plug-in busy past this fail with errc::timed_out,
  /// as do calls to an isolated one that has not answered.
  void set_deadline(clock::time_point deadline) noexcept;

  /// Calls service `name` with `arg`. Errors: service_not_found, timed_out,
  /// plugin_failed (it threw), context_busy, unavailable, stopped.
  result<std::uint64_t> call(std::string_view name, void* arg);
  /// The same through a resolved name: no lock, no lookup.
  result<std::uint64_t> call(const service_ref& ref, void* arg);
  /// Calls a bytes service; the reply lives in this context's pool, and the
  /// service's return value goes to `*value` when given.
  /// service_not_compatible for a pointer service.
  result<std::span<const std::byte>> call_bytes(std::string_view name,
                                                std::span<const std::byte> request,
                                                std::uint64_t* value = nullptr);

 private:
  friend class host;
  explicit context(uipc_plugin_context* ctx) : ctx_(ctx) {}
  uipc_plugin_context* ctx_ = nullptr;
};

/// The host.
///
/// Threading: every member may be called from any thread at once. No lock of
/// the host is held while plug-in code runs. Register and Init of a plug-in
/// run on the thread that loads it, and its services are visible only after
/// Init returned. Calls may come from any thread; the host keeps cooperative
/// plug-ins to one thread at a time and lets another in at yield points.
///
/// Lifetime: unloading (also reloading and the destructor) unpublishes a
/// plug-in's services at once; its Shutdown runs, and its code is unmapped,
/// once every call that began before has ended. The destructor waits for that.
class host {
 public:
  using clock = std::chrono::steady_clock;

  static result<std::unique_ptr<host>> create(host_options options = {});
  ~host();
  host(const host&) = delete;
  host& operator=(const host&) = delete;

  /// Loads a shared object: Register, then Init. Returns the plug-in's name.
  /// Errors: load_failed, no_entry_point, abi_mismatch, invalid_name,
  /// duplicate_plugin, init_failed (or the service errors Init ran into).
  /// The shared object is copied first: rebuilding it in place later is safe.
  result<std::string> load(const std::filesystem::path& shared_object);
  /// Loads a plug-in linked into the program, by its entry function.
  result<std::string> load(uipc_plugin_entry_fn entry);
  /// Loads a shared object into a process of its own (uipc-plugin-runner) and
  /// registers its services here, called through caps. Bytes services only
  /// cross: a pointer service is listed, and calling it gives
  /// service_not_compatible. When the process dies, calls fail with
  /// errc::unavailable and it is restarted with back-off; after
  /// options.max_crashes crashes with no options.crash_window of service
  /// between them it stays stopped
  /// (plugins() says why). Errors: as load(), and those of starting the
  /// runner (program_not_found of core, errc::timed_out).
  result<std::string> load_isolated(const std::filesystem::path& shared_object,
                                    isolation_options options = {});
  /// Replaces plug-in `name` with a new build (default: the file it was
  /// loaded from). New calls go to the new build at once; calls in flight
  /// finish in the old one, which then gets Shutdown and is unloaded. When
  /// the new build fails to load or init, the old one serves on. One load,
  /// reload or unload of a name at a time: another meanwhile, or a reload of
  /// a build that another reload replaced since, gets errc::duplicate_plugin.
  error_code reload(std::string_view name, const std::filesystem::path& shared_object = {});
  /// Unpublishes plug-in `name`'s services; Shutdown and unload follow once
  /// its calls have ended. Errors: plugin_not_found; duplicate_plugin while a
  /// reload of it is under way.
  error_code unload(std::string_view name);

  /// A context for a request.
  result<context> new_context();
  /// Resolves a service name (need not be registered yet); the name keeps its
  /// slot for the host's life (max_services). Errors: invalid_name, too_many.
  result<service_ref> resolve(std::string_view name);

  /// The registered services' names, TAB-delimited, sorted.
  std::string list_services() const;
  /// A registered service's flags (UIPC_PLUGIN_SERVICE_BYTES); service_not_found.
  result<std::uint32_t> service_flags(std::string_view name) const;
  std::vector<plugin_status> plugins() const;
  host_stats stats() const;

  /// Waits until every unloaded or replaced build has been shut down and
  /// unmapped, at most `timeout`; errc::timed_out while a call still runs in
  /// one, or a context still holds a pool cleanup of its code (registered on
  /// a context the build does not own: both wait for that context's end).
  error_code quiesce(std::chrono::milliseconds timeout);

  /// The C ABI callbacks (what plug-ins get at Init).
  static const uipc_plugin_host_api& api() noexcept;

  detail::host_impl& impl() noexcept { return *impl_; }

 private:
  explicit host(std::unique_ptr<detail::host_impl> impl);
  std::unique_ptr<detail::host_impl> impl_;
};

}  // namespace uipc::plugin
