// Isolated plug-ins: a runner process per plug-in, its services registered
// here as proxies that call it through caps (remote_services: a watcher
// thread follows what it registers or drops after Init), a supervisor thread
// that restarts it with back-off when it dies and stops it after too many
// crashes, and a caps point of the host's own for the runner, through which
// its plug-in calls the host's bytes services (the same protocol the other
// way, served by workers that grow while calls nest: A -> host -> A).
//
// The supervisor thread starts every runner, so that the runner's parent-death
// signal (PR_SET_PDEATHSIG fires when the creating thread ends) ties it to the
// supervisor: a host that dies takes its runners with it.
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <boost/asio/io_context.hpp>
#include <condition_variable>
#include <deque>
#include <future>
#include <string_view>

#include "change_watch.hpp"
#include "host_impl.hpp"
#include "protocol_server.hpp"
#include "remote_services.hpp"
#include "runner_protocol.hpp"
#include "uipc/caps/client.hpp"
#include "uipc/caps/service.hpp"
#include "uipc/core/daemon_start.hpp"
#include "worker_set.hpp"

extern char** environ;

namespace uipc::plugin::detail {
namespace {

namespace proto = runner_protocol;
using clock = std::chrono::steady_clock;

std::atomic<std::uint64_t> runner_counter{0};

// The host's own point for one runner: its plug-in calls the host's bytes
// services through it (not its own: those it calls in the runner).
class host_point {
 public:
  host_point(host_impl& host, std::function<bool(pid_t)> is_runner,
             std::function<bool(const plugin_record&)> is_served,
             std::chrono::milliseconds call_timeout)
      : host_(host),
        rules_{
            // What the runner may see is what it may call.
            [this] { return host_.describe("uipc.host", 0, changes_.version(), rules_.callable); },
            [is_runner = std::move(is_runner)](const peer_identity& p) { return is_runner(p.pid); },
            [is_served = std::move(is_served)](const service_entry& e) {
              return e.owner != nullptr && !is_served(*e.owner);
            },
            &changes_, call_timeout},
        workers_(2, 2 + max_nesting, [this] { serve_protocol(*svc_, host_, rules_); }) {}
  ~host_point() { stop(); }

  /// Registers the point (this user's only) and starts serving it.
  error_code start(const std::string& name, const std::string& directory) {
    caps::service_options o;
    o.directory = directory;
    o.exclusive = true;
    auto svc = caps::service::register_point(io_, name, o);
    if (!svc) return svc.error();
    svc_ = std::move(*svc);
    changes_.serve_on(svc_.get());
    host_.add_change_watch(&changes_);
    loop_ = std::thread([this] { io_.run(); });
    workers_.start();
    return {};
  }

  void stop() {
    if (!svc_) return;
    host_.remove_change_watch(&changes_);
    changes_.serve_on(nullptr);
    svc_->stop();
    workers_.join();
    io_.stop();
    if (loop_.joinable()) loop_.join();
    svc_.reset();
  }

  /// Workers beyond the first two, for calls that wait on the runner while
  /// others come back from it (A -> host -> A -> ...).
  static constexpr unsigned max_nesting = 16;

 private:
  host_impl& host_;
  change_watch changes_;
  protocol_rules rules_;
  boost::asio::io_context io_;
  std::unique_ptr<caps::service> svc_;
  worker_set workers_;
  std::thread loop_;
};

class runner_link final : public isolation {
 public:
  runner_link(host_impl& host, std::string path, isolation_options options, std::string name)
      : host_(host),
        path_(std::move(path)),
        options_(std::move(options)),
        remote_(host, path_, options_.call_timeout, options_.start_timeout),
        host_point_(
            host, [this](pid_t pid) { return is_runner(pid); },
            [this](const plugin_record& r) { return serves_as(r.name); }, options_.call_timeout),
        name_(std::move(name)) {}

  ~runner_link() override {
    pid_t pid;
    {
      std::lock_guard lock(mutex_);
      stopping_ = true;
      pid = pid_;
    }
    remote_.disconnect();
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
    remote_.join_watcher();  // its call failed when the runner ended
    // The host's point last: the plug-in's Shutdown, in the runner's ending,
    // may still call the host's services.
    host_point_.stop();
  }

  /// Registers the host's point for the runner, starts the supervisor and
  /// waits for the first start: what the runner serves.
  result<proto::listing> start() {
    host_point_name_ = "uipc.host." + std::to_string(::getpid()) + "." +
                       std::to_string(runner_counter.fetch_add(1));
    if (auto ec = host_point_.start(host_point_name_, options_.directory)) return ec;
    std::promise<result<proto::listing>> first;
    auto answer = first.get_future();
    supervising_ = true;
    supervisor_ = std::thread([this, p = std::move(first)]() mutable { supervise(p); });
    auto listed = answer.get();
    if (listed) {
      std::lock_guard lock(name_mutex_);
      name_ = listed->plugin;
    }
    return listed;
  }

  void status(std::string& state, std::uint32_t& crashes, std::string& last_error) const override {
    std::lock_guard lock(mutex_);
    state = state_;
    crashes = crashes_;
    last_error = last_error_;
  }

  const isolation_options& options() const override { return options_; }

  std::vector<relayed_service> entries_for(const proto::listing& listed) {
    return remote_.entries_for(listed);
  }

  /// The build is serving as `record`: from now on its services follow the runner's.
  void start_watching(plugin_record& record, proto::listing listed) {
    std::lock_guard lock(mutex_);
    record_ = &record;
    remote_.start_watching(record, std::move(listed));
  }

 private:
  // One start: spawn, connect, list. On this (the supervisor) thread.
  result<proto::listing> launch() {
    program_search search{"uipc-plugin-runner", options_.runner, "UIPC_PLUGIN_RUNNER"};
    auto program = find_program(search);
    if (!program) return program.error();
    const std::string point = "uipc.runner." + std::to_string(::getpid()) + "." +
                              std::to_string(runner_counter.fetch_add(1));
    std::vector<std::string> args{*program,
                                  "--point",
                                  point,
                                  "--parent",
                                  std::to_string(::getpid()),
                                  "--host-point",
                                  host_point_name_,
                                  "--call-timeout",
                                  std::to_string(options_.call_timeout.count())};
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
    {
      // Held across the spawn: the runner asks the host's point at once, and
      // the point serves only the pid stored here.
      std::lock_guard lock(mutex_);
      if (int e = ::posix_spawn(&pid, program->c_str(), nullptr, nullptr, argv.data(), envp.data());
          e != 0)
        return error_code(e, boost::system::system_category());
      pid_ = pid;
    }
    // Wait for its point in slices, watching the runner: one whose plug-in
    // does not load exits at once, and says so sooner than the timeout.
    const auto give_up = clock::now() + options_.start_timeout;
    caps::client_options copts;
    copts.wait_for_point = std::chrono::milliseconds(50);
    copts.handshake_timeout = options_.start_timeout;
    const caps::point_address address{point, ::getuid(), std::nullopt, options_.directory};
    auto client = caps::client::connect(remote_.io(), address, copts);
    while (!client && client.error() == caps::errc::not_registered && clock::now() < give_up) {
      int status = 0;
      if (::waitpid(pid, &status, WNOHANG) == pid) {
        {
          std::lock_guard lock(mutex_);
          pid_ = 0;
        }
        const bool refused =
            WIFEXITED(status) && WEXITSTATUS(status) == 1;  // the runner's "did not load"
        host_.log(0, path_ + ": the runner ended before serving (" +
                         (WIFEXITED(status) ? "exit status " + std::to_string(WEXITSTATUS(status))
                                            : "signal " + std::to_string(WTERMSIG(status))) +
                         ")");
        return refused ? errc::load_failed : errc::unavailable;
      }
      client = caps::client::connect(remote_.io(), address, copts);
    }
    if (!client) return client.error();
    // The point's name is no secret: another process of the user may have
    // taken it first. Only the runner started here is served through.
    if ((*client)->server().pid != pid) {
      host_.log(0, path_ + ": " + point + " is served by pid " +
                       std::to_string((*client)->server().pid) + ", not by the runner (pid " +
                       std::to_string(pid) + ")");
      return errc::unavailable;
    }
    auto out = remote_.list(**client);
    if (!out) return out.error();
    remote_.connect(std::shared_ptr<caps::client>(std::move(*client)), address);
    std::lock_guard lock(mutex_);
    state_ = "running";
    return out;
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
    }
    remote_.disconnect();
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
    remote_.disconnect();
    std::lock_guard lock(mutex_);
    pid_ = 0;
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
    // Crashes since a runner last served a whole crash_window: max_crashes of
    // them stop the plug-in. The back-off doubles from first_backoff up to
    // crash_window and starts over with them. (Counted by time window, a
    // back-off as long as the window would itself start both over, and a
    // runner that dies at every start would be restarted for ever.)
    std::size_t recent = 0;
    auto serving_since = clock::now();
    const std::chrono::milliseconds longest =
        std::max<std::chrono::milliseconds>(options_.first_backoff, options_.crash_window);
    std::chrono::milliseconds backoff = options_.first_backoff;
    auto wait_backoff = [&] {  // false: stopped meanwhile
      std::unique_lock lock(mutex_);
      const bool stopped = wake_.wait_for(lock, backoff, [&] { return stopping_; });
      backoff = std::min(backoff * 2, longest);
      return !stopped;
    };
    for (;;) {
      std::string why;
      if (wait_for_exit(why)) break;  // stopped by the host
      remote_.join_watcher();         // its call failed with the runner
      if (clock::now() - serving_since >= options_.crash_window) {
        recent = 0;
        backoff = options_.first_backoff;
      }
      ++recent;
      bool given_up = false;
      std::string said;  // the log is user code: written with no lock of ours held
      {
        std::lock_guard lock(mutex_);
        ++crashes_;
        last_error_ = why;
        if (recent >= options_.max_crashes) {
          state_ = "stopped";
          last_error_ = why + "; " + std::to_string(recent) + " crashes, not restarted";
          said = last_error_;
          given_up = true;
        } else {
          state_ = "restarting";
          said = why + "; restarting in " + std::to_string(backoff.count()) + " ms";
        }
      }
      host_.log(given_up ? 0 : 1, path_ + ": " + said);
      if (given_up || !wait_backoff()) break;
      for (;;) {
        auto again = launch();
        if (again) {
          serving_since = clock::now();
          // The new process may serve other services than the last one did.
          std::lock_guard lock(mutex_);
          if (record_ != nullptr && !stopping_) remote_.start_watching(*record_, std::move(*again));
          break;
        }
        kill_and_reap();
        ++recent;
        std::string failed;
        {
          std::lock_guard lock(mutex_);
          ++crashes_;
          last_error_ = "restart failed: " + again.error().message();
          if (recent >= options_.max_crashes || stopping_) {
            state_ = "stopped";
            failed = last_error_;
          }
        }
        if (!failed.empty()) host_.log(0, path_ + ": " + failed + "; not restarted");
        if (!failed.empty() || !wait_backoff()) {
          end_supervising();
          return;
        }
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

  void end_supervising_locked() {
    supervising_ = false;
    wake_.notify_all();
  }

  bool is_runner(pid_t pid) const {
    std::lock_guard lock(mutex_);
    return pid != 0 && pid == pid_;
  }
  // Whether `plugin` is the plug-in this runner serves (any build of it).
  bool serves_as(const std::string& plugin) const {
    std::lock_guard lock(name_mutex_);
    return !name_.empty() && plugin == name_;
  }

  host_impl& host_;
  std::string path_;
  isolation_options options_;
  remote_services remote_;  // what the runner serves, relayed here
  host_point host_point_;   // what the host serves, for the runner
  std::string host_point_name_;

  mutable std::mutex name_mutex_;
  std::string name_;  // the plug-in's name: the old build's at a reload, then as listed

  mutable std::mutex mutex_;
  std::condition_variable wake_;
  pid_t pid_ = 0;
  bool stopping_ = false;
  bool supervising_ = false;
  std::string state_ = "starting";
  std::uint32_t crashes_ = 0;
  std::string last_error_;
  std::thread supervisor_;
  plugin_record* record_ = nullptr;  // the build it serves, once serving (it owns this link)
};

}  // namespace

// Starts a runner for `path` and loads what it serves as a build of its own:
// a new plug-in, or (with `old`) the next build of `old`.
result<std::string> load_isolated(host_impl& host, const std::filesystem::path& path,
                                  isolation_options options,
                                  const std::shared_ptr<plugin_record>& old) {
  if (host.stopping.load()) return errc::stopped;
  auto record = std::make_shared<plugin_record>();
  record->path = std::filesystem::absolute(path).string();
  auto link =
      std::make_unique<runner_link>(host, record->path, std::move(options), old ? old->name : "");
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
  // The log is user code: written once the registry is let go.
  std::string why_not;
  std::vector<std::string> not_staged;
  {
    std::lock_guard lock(host.registry_mutex);
    why_not = host.reserve(*record, old);
    if (why_not.empty()) {
      for (auto& [name, entry] : raw_link->entries_for(*served)) {
        if (int s = host.stage(*record, name, entry); s != UIPC_PLUGIN_OK)
          not_staged.push_back("service " + name + " not registered here: " + status_text(s));
      }
    }
  }
  if (!why_not.empty()) {
    host.log(0, "isolated load of " + record->path + " refused: " + why_not);
    return errc::duplicate_plugin;
  }
  // Held across the start of the watcher: an unload racing this load may
  // retire the build at once.
  const std::shared_ptr<plugin_record> keep = record;
  auto committed = host.commit(std::move(record), old);
  if (committed) raw_link->start_watching(*keep, std::move(*served));
  // After the commit: the log (user code) may throw, and the name is free again.
  for (const auto& line : not_staged) host.log(1, keep->name + ": " + line);
  return committed;
}

}  // namespace uipc::plugin::detail
