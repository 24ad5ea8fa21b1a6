// Isolated plug-ins: a runner process per plug-in, its services registered
// here as proxies that call it through caps, a supervisor thread that
// restarts it with back-off when it dies, and stops it after too many crashes,
// and a watcher thread that follows the services it registers or drops after
// Init (a long-poll watch request the runner answers when they change).
//
// The supervisor thread starts every runner, so that the runner's parent-death
// signal (PR_SET_PDEATHSIG fires when the creating thread ends) ties it to the
// supervisor: a host that dies takes its runners with it.
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <boost/asio/io_context.hpp>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <future>
#include <string_view>

#include "host_impl.hpp"
#include "runner_protocol.hpp"
#include "uipc/caps/client.hpp"
#include "uipc/core/daemon_start.hpp"

extern char** environ;

namespace uipc::plugin::detail {
namespace {

namespace proto = runner_protocol;
using clock = std::chrono::steady_clock;

std::atomic<std::uint64_t> runner_counter{0};

class runner_link;

class proxy final : public isolation_proxy {
 public:
  proxy(runner_link& link, std::string name) : link_(link), name_(std::move(name)) {}
  int call(uipc_plugin_context* ctx, void* arg, std::uint64_t* out) override;
  const std::string& name() const noexcept { return name_; }

 private:
  runner_link& link_;
  std::string name_;
};

class runner_link final : public isolation {
 public:
  runner_link(host_impl& host, std::string path, isolation_options options)
      : host_(host), path_(std::move(path)), options_(std::move(options)) {}

  ~runner_link() override {
    pid_t pid;
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
      pid = pid_;
      client_.reset();
    }
    wake_.notify_all();
    if (pid > 0) ::kill(pid, SIGTERM);
    // Escalate if the runner does not end within a second (its plug-in's Shutdown hangs).
    if (supervisor_.joinable()) {
      std::unique_lock lock(mutex_);
      if (!wake_.wait_for(lock, std::chrono::seconds(1), [&] { return !supervising_; }) && pid_ > 0)
        ::kill(pid_, SIGKILL);
      lock.unlock();
      supervisor_.join();
    }
    join_watcher();  // its call failed when the runner ended
  }

  /// Starts the supervisor and waits for the first start: what the runner serves.
  result<proto::listing> start() {
    std::promise<result<proto::listing>> first;
    auto answer = first.get_future();
    supervising_ = true;
    supervisor_ = std::thread([this, p = std::move(first)]() mutable { supervise(p); });
    return answer.get();
  }

  void status(std::string& state, std::uint32_t& crashes, std::string& last_error) const override {
    std::lock_guard lock(mutex_);
    state = state_;
    crashes = crashes_;
    last_error = last_error_;
  }

  const isolation_options& options() const override { return options_; }

  /// The entries that call what the runner lists: a proxy per bytes service
  /// (one per name for the link's life), pointer services listed only.
  std::vector<relayed_service> entries_for(const proto::listing& listed) {
    std::vector<relayed_service> out;
    for (const auto& [name, flags] : listed.services) {
      service_entry entry;
      if (flags & UIPC_PLUGIN_SERVICE_BYTES) {
        std::lock_guard lock(proxies_mutex_);
        auto it = std::find_if(proxies_.begin(), proxies_.end(),
                               [&](const proxy& p) { return p.name() == name; });
        proxy& p = it != proxies_.end() ? *it : proxies_.emplace_back(*this, name);
        entry.data = static_cast<isolation_proxy*>(&p);
        entry.flags = UIPC_PLUGIN_SERVICE_BYTES | isolated_service;
      } else {
        entry.flags = remote_pointer_service;
      }
      out.push_back({name, entry});
    }
    return out;
  }

  /// The build is serving as `record`: from now on its services follow the runner's.
  void start_watching(plugin_record& record, proto::listing listed) {
    std::lock_guard lock(mutex_);
    record_ = &record;
    start_watcher_locked(std::move(listed));
  }

  int call(uipc_plugin_context* ctx, const std::string& service, void* arg, std::uint64_t* out) {
    auto* bc = static_cast<uipc_plugin_bytes_call*>(arg);
    if (!bc || bc->size < sizeof(uipc_plugin_bytes_call) || (bc->in_size && !bc->in))
      return UIPC_PLUGIN_E_INVALID_ARGUMENT;
    std::shared_ptr<caps::client> client;
    {
      std::lock_guard lock(mutex_);
      client = client_;
    }
    if (!client) return UIPC_PLUGIN_E_UNAVAILABLE;
    const auto deadline = ctx->deadline != clock::time_point::max()
                              ? ctx->deadline
                              : clock::now() + options_.call_timeout;
    const std::size_t size = 2 + service.size() + bc->in_size;
    auto reply = client->call_in_place(
        size,
        [&](std::span<std::byte> b) {
          b[0] = static_cast<std::byte>(proto::call);
          b[1] = static_cast<std::byte>(service.size());
          std::memcpy(b.data() + 2, service.data(), service.size());
          if (bc->in_size) std::memcpy(b.data() + 2 + service.size(), bc->in, bc->in_size);
        },
        deadline);
    if (!reply) {
      if (reply.error() == caps::errc::timed_out) return UIPC_PLUGIN_E_TIMED_OUT;
      if (reply.error() == caps::errc::message_too_large) return UIPC_PLUGIN_E_INVALID_ARGUMENT;
      return UIPC_PLUGIN_E_UNAVAILABLE;  // the runner died: the supervisor restarts it
    }
    // The runner's bytes: checked and copied before anything else. (The
    // runner can still write them meanwhile: the copy is what counts.)
    auto answer = proto::parse_reply(reply->view());
    if (!answer) return UIPC_PLUGIN_E_PLUGIN_FAILED;
    if (answer->status != UIPC_PLUGIN_OK) return answer->status;
    const std::size_t n = answer->bytes.size();
    void* copy = nullptr;
    if (n) {
      if (int s = ctx->memory.allocate(n, &copy); s != UIPC_PLUGIN_OK) return s;
      std::memcpy(copy, answer->bytes.data(), n);
    }
    bc->out = copy;
    bc->out_size = n;
    *out = answer->result;
    return UIPC_PLUGIN_OK;
  }

 private:
  // One start: spawn, connect, list. On this (the supervisor) thread.
  result<proto::listing> launch() {
    program_search search{"uipc-plugin-runner", options_.runner, "UIPC_PLUGIN_RUNNER"};
    auto program = find_program(search);
    if (!program) return program.error();
    const std::string point = "uipc.runner." + std::to_string(::getpid()) + "." +
                              std::to_string(runner_counter.fetch_add(1));
    std::vector<std::string> args{*program, "--point", point, "--parent",
                                  std::to_string(::getpid())};
    if (!options_.directory.empty()) {
      args.push_back("--dir");
      args.push_back(options_.directory);
    }
    args.push_back(path_);
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    auto env = runner_environment();
    if (!env) return env.error();
    std::vector<char*> envp;
    for (auto& e : *env) envp.push_back(e.data());
    envp.push_back(nullptr);
    pid_t pid = 0;
    if (int e = ::posix_spawn(&pid, program->c_str(), nullptr, nullptr, argv.data(), envp.data());
        e != 0)
      return error_code(e, boost::system::system_category());
    {
      std::lock_guard lock(mutex_);
      pid_ = pid;
    }
    // Wait for its point in slices, watching the runner: one whose plug-in
    // does not load exits at once, and says so sooner than the timeout.
    const auto give_up = clock::now() + options_.start_timeout;
    caps::client_options copts;
    copts.wait_for_point = std::chrono::milliseconds(50);
    copts.handshake_timeout = options_.start_timeout;
    const caps::point_address address{point, ::getuid(), std::nullopt, options_.directory};
    auto client = caps::client::connect(io_, address, copts);
    while (!client && client.error() == caps::errc::not_registered && clock::now() < give_up) {
      int status = 0;
      if (::waitpid(pid, &status, WNOHANG) == pid) {
        std::lock_guard lock(mutex_);
        pid_ = 0;
        const bool refused =
            WIFEXITED(status) && WEXITSTATUS(status) == 1;  // the runner's "did not load"
        host_.log(0, path_ + ": the runner ended before serving (" +
                         (WIFEXITED(status) ? "exit status " + std::to_string(WEXITSTATUS(status))
                                            : "signal " + std::to_string(WTERMSIG(status))) +
                         ")");
        return refused ? errc::load_failed : errc::unavailable;
      }
      client = caps::client::connect(io_, address, copts);
    }
    if (!client) return client.error();
    const std::byte list_request[2] = {static_cast<std::byte>(proto::list), std::byte{0}};
    auto reply = (*client)->call(std::span(list_request), clock::now() + options_.start_timeout);
    if (!reply) return reply.error();
    auto out = proto::parse_listing(reply->copy());
    if (!out) return errc::plugin_failed;
    std::lock_guard lock(mutex_);
    client_ = std::shared_ptr<caps::client>(std::move(*client));
    address_ = address;
    state_ = "running";
    return std::move(*out);
  }

  // This process's environment with options_.environment's entries over it
  // (an entry without '=' unsets its name). A hook that throws fails this
  // start (load_failed, and the host's log says why) instead of the program.
  result<std::vector<std::string>> runner_environment() const {
    std::vector<std::string> extra;
    try {
      if (options_.environment) extra = options_.environment();  // no lock of ours held
    } catch (const std::exception& e) {
      host_.log(0, path_ + ": the environment hook threw: " + e.what());
      return make_error_code(errc::load_failed);
    } catch (...) {
      host_.log(0, path_ + ": the environment hook threw");
      return make_error_code(errc::load_failed);
    }
    auto name_of = [](std::string_view entry) { return entry.substr(0, entry.find('=')); };
    std::vector<std::string> env;
    for (char** e = environ; *e != nullptr; ++e) {
      const std::string_view entry(*e);
      const bool replaced = std::any_of(extra.begin(), extra.end(), [&](const std::string& x) {
        return name_of(x) == name_of(entry);
      });
      if (!replaced) env.emplace_back(entry);
    }
    for (auto& x : extra) {
      if (x.find('=') != std::string::npos) env.push_back(std::move(x));
    }
    return env;
  }

  void kill_and_reap() {
    pid_t pid;
    {
      std::lock_guard lock(mutex_);
      pid = pid_;
      client_.reset();
    }
    if (pid <= 0) return;
    ::kill(pid, SIGKILL);
    while (::waitpid(pid, nullptr, 0) < 0 && errno == EINTR) {
    }
    std::lock_guard lock(mutex_);
    pid_ = 0;
  }

  // Waits for the runner's end; true when it ended by our stop.
  bool wait_for_exit(std::string& why) {
    pid_t pid;
    {
      std::lock_guard lock(mutex_);
      pid = pid_;
    }
    int status = 0;
    pid_t r;
    while ((r = ::waitpid(pid, &status, 0)) < 0 && errno == EINTR) {
    }
    std::lock_guard lock(mutex_);
    pid_ = 0;
    client_.reset();
    if (r < 0)
      why = "lost track of the runner: " + std::string(std::strerror(errno));
    else if (WIFSIGNALED(status))
      why = "runner killed by signal " + std::to_string(WTERMSIG(status));
    else
      why = "runner exited with status " + std::to_string(WEXITSTATUS(status));
    return stopping_;
  }

  void supervise(std::promise<result<proto::listing>>& first) {
    auto started = launch();
    if (!started) {
      kill_and_reap();
      end_supervising();
      first.set_value(started.error());
      return;
    }
    first.set_value(std::move(started));  // load_isolated starts the watcher once it serves
    std::deque<clock::time_point> recent;
    std::chrono::milliseconds backoff = options_.first_backoff;
    for (;;) {
      std::string why;
      if (wait_for_exit(why)) break;  // stopped by the host
      join_watcher();                 // its call failed with the runner
      const auto now = clock::now();
      recent.push_back(now);
      while (!recent.empty() && now - recent.front() > options_.crash_window) recent.pop_front();
      {
        std::unique_lock lock(mutex_);
        ++crashes_;
        last_error_ = why;
        if (recent.size() >= options_.max_crashes) {
          state_ = "stopped";
          last_error_ = why + "; " + std::to_string(recent.size()) + " crashes, not restarted";
          host_.log(0, path_ + ": " + last_error_);
          break;
        }
        state_ = "restarting";
        host_.log(
            1, path_ + ": " + why + "; restarting in " + std::to_string(backoff.count()) + " ms");
        if (wake_.wait_for(lock, backoff, [&] { return stopping_; })) break;
      }
      backoff *= 2;
      for (;;) {
        auto again = launch();
        if (again) {
          // The new process may serve other services than the last one did.
          std::lock_guard lock(mutex_);
          if (record_ != nullptr && !stopping_) start_watcher_locked(std::move(*again));
          break;
        }
        kill_and_reap();
        std::unique_lock lock(mutex_);
        ++crashes_;
        last_error_ = "restart failed: " + again.error().message();
        recent.push_back(clock::now());
        if (recent.size() >= options_.max_crashes || stopping_) {
          state_ = "stopped";
          host_.log(0, path_ + ": " + last_error_ + "; not restarted");
          end_supervising_locked();
          return;
        }
        if (wake_.wait_for(lock, backoff, [&] { return stopping_; })) {
          end_supervising_locked();
          return;
        }
        backoff *= 2;
      }
      {
        std::lock_guard lock(mutex_);
        if (stopping_) break;
      }
      try {
        if (options_.on_restart) options_.on_restart();  // no lock of ours held
      } catch (const std::exception& e) {
        host_.log(0, path_ + ": the on_restart hook threw: " + e.what());
      } catch (...) {
        host_.log(0, path_ + ": the on_restart hook threw");
      }
    }
    kill_and_reap();
    end_supervising();
  }

  void end_supervising() {
    std::lock_guard lock(mutex_);
    end_supervising_locked();
  }

  // The watcher: publishes what `listed` says, then waits for the runner's
  // next change and lists again, until the runner goes (the call fails).
  void start_watcher_locked(proto::listing listed) {
    // No runner to watch (it died; its restart starts one), or one watched already.
    if (!client_ || watcher_.joinable()) return;
    watcher_ = std::thread([this, address = address_, l = std::move(listed)]() mutable {
      watch(address, std::move(l));
    });
  }

  void watch(const caps::point_address& address, proto::listing listed) {
    // A connection of its own: a call waiting on the proxies' connection
    // would be woken by every reply to them.
    caps::client_options copts;
    copts.handshake_timeout = options_.start_timeout;
    copts.max_spin = std::chrono::nanoseconds(0);  // it waits long: sleep at once
    auto connected = caps::client::connect(io_, address, copts);
    if (!connected) return;  // the runner went already: a restart watches again
    caps::client& client = **connected;
    for (;;) {
      host_.relay(*record_, entries_for(listed));
      std::array<std::byte, 10> request{static_cast<std::byte>(proto::watch), std::byte{0}};
      std::memcpy(request.data() + 2, &listed.version, sizeof listed.version);
      auto changed = client.call(std::span<const std::byte>(request), clock::time_point::max());
      if (!changed) return;  // the runner went: a restart watches again
      const std::byte list_request[2] = {static_cast<std::byte>(proto::list), std::byte{0}};
      auto reply = client.call(std::span(list_request), clock::now() + options_.start_timeout);
      if (!reply) return;
      auto parsed = proto::parse_listing(reply->copy());
      if (!parsed) {
        host_.log(1, path_ + ": the runner's list of services is malformed; not followed");
        return;
      }
      listed = std::move(*parsed);
    }
  }

  void join_watcher() {
    std::thread w;
    {
      std::lock_guard lock(mutex_);
      w = std::move(watcher_);
    }
    if (w.joinable()) w.join();
  }
  void end_supervising_locked() {
    supervising_ = false;
    wake_.notify_all();
  }

  host_impl& host_;
  std::string path_;
  isolation_options options_;
  boost::asio::io_context io_;  // the clients' (blocking calls need it not running)
  std::mutex proxies_mutex_;
  std::deque<proxy> proxies_;  // stable addresses: registered entries point at them

  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::shared_ptr<caps::client> client_;
  pid_t pid_ = 0;
  bool stopping_ = false;
  bool supervising_ = false;
  std::string state_ = "starting";
  std::uint32_t crashes_ = 0;
  std::string last_error_;
  std::thread supervisor_;
  plugin_record* record_ = nullptr;  // the build it serves, once serving (it owns this link)
  caps::point_address address_{};    // the running runner's point
  std::thread watcher_;
};

int proxy::call(uipc_plugin_context* ctx, void* arg, std::uint64_t* out) {
  return link_.call(ctx, name_, arg, out);
}

}  // namespace

// Starts a runner for `path` and loads what it serves as a build of its own:
// a new plug-in, or (with `old`) the next build of `old`.
result<std::string> load_isolated(host_impl& host, const std::filesystem::path& path,
                                  isolation_options options,
                                  const std::shared_ptr<plugin_record>& old) {
  if (host.stopping.load()) return errc::stopped;
  auto record = std::make_shared<plugin_record>();
  record->path = std::filesystem::absolute(path).string();
  auto link = std::make_unique<runner_link>(host, record->path, std::move(options));
  auto served = link->start();
  if (!served) {
    host.log(0, "isolated load of " + record->path + " failed: " + served.error().message());
    return served.error();
  }
  if (old && served->plugin != old->name) {
    host.log(0, "isolated reload of " + old->name + " refused: the new build calls itself " +
                    served->plugin);
    return errc::invalid_name;
  }
  record->name = served->plugin;
  record->cooperative = false;  // the runner's own host keeps a cooperative plug-in to one thread
  record->info.size = sizeof(uipc_plugin_info);
  record->info.abi_major = UIPC_PLUGIN_ABI_MAJOR;
  record->info.abi_minor = UIPC_PLUGIN_ABI_MINOR;
  record->info.flags = served->flags;
  auto* raw_link = link.get();
  record->isolated = std::move(link);
  {
    std::lock_guard lock(host.registry_mutex);
    if ((!old && host.plugins.count(record->name)) || host.loading.count(record->name))
      return errc::duplicate_plugin;
    host.loading.insert(record->name);
    record->predecessor = old.get();
    record->generation = old ? old->generation + 1 : 0;
    for (auto& [name, entry] : raw_link->entries_for(*served)) {
      if (int s = host.stage(*record, name, entry); s != UIPC_PLUGIN_OK)
        host.log(1, record->name + ": service " + name + " not registered here: " + status_text(s));
    }
  }
  // Held across the start of the watcher: an unload racing this load may
  // retire the build at once.
  const std::shared_ptr<plugin_record> keep = record;
  auto committed = host.commit(std::move(record), old);
  if (committed) raw_link->start_watching(*keep, std::move(*served));
  return committed;
}

}  // namespace uipc::plugin::detail
