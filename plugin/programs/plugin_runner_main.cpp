// uipc-plugin-runner: runs one plug-in in a process of its own for a host
// (host::load_isolated starts it): loads the shared object into a host of its
// own and serves its bytes services on a caps point (src/runner_protocol.hpp).
// A plug-in that crashes takes this process down, not the host.
#include <sys/prctl.h>
#include <unistd.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>

#include "change_watch.hpp"
#include "host_impl.hpp"
#include "protocol_server.hpp"
#include "remote_services.hpp"
#include "uipc/caps/client.hpp"
#include "uipc/caps/service.hpp"
#include "uipc/plugin/host.hpp"
#include "worker_set.hpp"

namespace {

namespace detail = uipc::plugin::detail;

int usage(int status) {
  std::fprintf(status ? stderr : stdout,
               "usage: uipc-plugin-runner --point NAME [--dir DIR] [--parent PID] [--threads N]\n"
               "                          [--host-point HOST] [--call-timeout MS] PLUGIN.so\n"
               "Runs one plug-in for a uipc plug-in host, serving its bytes services on the caps\n"
               "point NAME (of this user; DIR: the rendezvous directory). With --parent, ends\n"
               "when that process (the host) does, serves it alone, and follows HOST only\n"
               "when that process serves it. With --host-point, the plug-in calls the\n"
               "host's bytes services through the host's point HOST as if they were here,\n"
               "each call given MS milliseconds (default 5000).\n"
               "N threads serve calls (default 2); calls that nest through the host (this\n"
               "plug-in -> host -> this plug-in) start more, at most N + 16.\n"
               "Exit status: 0 stopped by SIGTERM or SIGINT; 1 the plug-in did not load;\n"
               "2 the point could not be registered; 3 the host's point could not be reached;\n"
               "64 usage.\n");
  return status;
}

using detail::change_watch;

// Services registered or gone in this runner's host after Init, for the
// host's watch requests (a long poll: answered when something changed).
change_watch watch_state;

// A plug-in of the runner's own, loaded first, told of every service event of
// the plug-in it runs; not listed to the host.
constexpr const char* watcher_name = "uipc.runner.watch";
int watcher_init(uipc_plugin_context*, const uipc_plugin_host_api*) { return UIPC_PLUGIN_OK; }
void watcher_event(uipc_plugin_context*, const char*, int) { watch_state.changed(); }
const uipc_plugin_info watcher_info{sizeof(uipc_plugin_info),
                                    UIPC_PLUGIN_ABI_MAJOR,
                                    UIPC_PLUGIN_ABI_MINOR,
                                    watcher_name,
                                    UIPC_PLUGIN_PREEMPTIVE,
                                    0,
                                    watcher_init,
                                    nullptr,
                                    watcher_event};
const uipc_plugin_info* watcher_entry(std::uint32_t, std::uint32_t) { return &watcher_info; }

// The host's bytes services, relayed into this runner's host as the services
// of a plug-in of the runner's own (calls to them go to the host's point).
constexpr const char* host_plugin_name = "uipc.host";
int host_plugin_init(uipc_plugin_context*, const uipc_plugin_host_api*) { return UIPC_PLUGIN_OK; }
const uipc_plugin_info host_plugin_info{sizeof(uipc_plugin_info),
                                        UIPC_PLUGIN_ABI_MAJOR,
                                        UIPC_PLUGIN_ABI_MINOR,
                                        host_plugin_name,
                                        UIPC_PLUGIN_PREEMPTIVE,
                                        0,
                                        host_plugin_init,
                                        nullptr,
                                        nullptr};
const uipc_plugin_info* host_plugin_entry(std::uint32_t, std::uint32_t) {
  return &host_plugin_info;
}

// Only the services of the plug-in this runner runs cross to the host.
bool served_here(const detail::service_entry& e) {
  return e.owner != nullptr && e.owner->name != watcher_name && e.owner->name != host_plugin_name;
}

std::string describe(uipc::plugin::host& h) {
  std::string plugin;
  std::uint32_t flags = 0;
  for (const auto& p : h.plugins()) {
    if (p.name == watcher_name || p.name == host_plugin_name) continue;
    plugin = p.name;
    flags = p.preemptive ? UIPC_PLUGIN_PREEMPTIVE : 0;
  }
  return h.impl().describe(plugin, flags, watch_state.version(), served_here);
}

// Connects to the host's point and relays what it serves into `h` (before the
// plug-in loads: its Init may call them). False when the host cannot be reached.
bool follow_host(uipc::plugin::host& h, detail::remote_services& remote, const std::string& point,
                 const std::string& dir, long parent) {
  uipc::caps::client_options copts;
  copts.wait_for_point = std::chrono::seconds(1);  // registered before we were started
  const uipc::caps::point_address address{point, ::getuid(), std::nullopt, dir};
  auto client = uipc::caps::client::connect(remote.io(), address, copts);
  if (!client) {
    std::fprintf(stderr, "uipc-plugin-runner: cannot reach the host at %s: %s\n", point.c_str(),
                 client.error().message().c_str());
    return false;
  }
  // Another process of the user may serve a point of that name: only the host
  // that started us is followed.
  if (parent > 0 && (*client)->server().pid != parent) {
    std::fprintf(stderr, "uipc-plugin-runner: %s is served by pid %d, not by the host (pid %ld)\n",
                 point.c_str(), static_cast<int>((*client)->server().pid), parent);
    return false;
  }
  auto listed = remote.list(**client);
  if (!listed || !h.load(host_plugin_entry)) return false;
  std::shared_ptr<detail::plugin_record> record;
  {
    std::lock_guard lock(h.impl().registry_mutex);
    record = h.impl().plugins.at(host_plugin_name);
  }
  // Published now, before the plug-in's Init; the watcher follows from here.
  h.impl().relay(*record, remote.entries_for(*listed));
  remote.connect(std::shared_ptr<uipc::caps::client>(std::move(*client)), address);
  remote.start_watching(*record, std::move(*listed));
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  std::string point, dir, plugin, host_point;
  long parent = 0;
  unsigned threads = 2;
  long call_timeout_ms = 5000;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--point" && i + 1 < argc)
      point = argv[++i];
    else if (arg == "--host-point" && i + 1 < argc)
      host_point = argv[++i];
    else if (arg == "--dir" && i + 1 < argc)
      dir = argv[++i];
    else if (arg == "--parent" && i + 1 < argc)
      parent = std::strtol(argv[++i], nullptr, 10);
    else if (arg == "--call-timeout" && i + 1 < argc)
      call_timeout_ms = std::strtol(argv[++i], nullptr, 10);
    else if (arg == "--threads" && i + 1 < argc)
      threads = static_cast<unsigned>(std::strtoul(argv[++i], nullptr, 10));
    else if (arg == "--help" || arg == "-h")
      return usage(0);
    else if (!arg.empty() && arg[0] != '-' && plugin.empty())
      plugin = arg;
    else
      return usage(64);
  }
  if (point.empty() || plugin.empty() || threads == 0 || threads > 64 || call_timeout_ms <= 0)
    return usage(64);
  if (parent > 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent) return 1;  // the host is gone already
  }

  auto h = uipc::plugin::host::create();
  if (!h) return 1;
  if (!(*h)->load(watcher_entry)) return 1;
  std::unique_ptr<detail::remote_services> remote;  // the host's services, when it offers them
  std::string loaded_name;
  // On every way out from here: the plug-in goes first, its Shutdown run while
  // the host's services are still here to call; then the watcher of those
  // stops, and the runner's host goes while `remote` (their proxies) lives.
  struct ending {
    std::unique_ptr<uipc::plugin::host>& h;
    std::unique_ptr<detail::remote_services>& remote;
    const std::string& plugin;
    ~ending() {
      if (!plugin.empty() && !h->unload(plugin)) (void)h->quiesce(std::chrono::seconds(5));
      if (remote) remote->stop_watching();
      h.reset();
    }
  } end{*h, remote, loaded_name};
  if (!host_point.empty()) {
    remote = std::make_unique<detail::remote_services>((*h)->impl(), "the host",
                                                       std::chrono::milliseconds(call_timeout_ms),
                                                       std::chrono::seconds(5));
    if (!follow_host(**h, *remote, host_point, dir, parent)) return 3;
  }
  auto loaded = (*h)->load(plugin);
  if (loaded) loaded_name = *loaded;
  if (!loaded) {
    std::fprintf(stderr, "uipc-plugin-runner: %s: %s\n", plugin.c_str(),
                 loaded.error().message().c_str());
    return 1;
  }
  boost::asio::io_context io;
  uipc::caps::service_options options;
  options.directory = dir;
  // The next call often follows at once: wait for it spinning briefly before
  // sleeping (a wake-up through the doorbell cost 18-25 us a call against 2.5
  // spinning). The wait policy stops spinning where it does not pay: while
  // idle, and with the host on the same CPU.
  options.max_spin = std::chrono::microseconds(20);
  auto svc = uipc::caps::service::register_point(io, point, options);
  if (!svc) {
    std::fprintf(stderr, "uipc-plugin-runner: cannot register %s: %s\n", point.c_str(),
                 svc.error().message().c_str());
    return 2;
  }
  watch_state.serve_on(svc->get());
  boost::asio::signal_set signals(io, SIGINT, SIGTERM);
  signals.async_wait([&](boost::system::error_code, int) { (*svc)->stop(); });
  std::thread loop([&] { io.run(); });
  // With a parent, the point serves the host alone: another process of the
  // user that connects is refused before any request of it is served.
  std::function<bool(const uipc::peer_identity&)> only_the_host;
  if (parent > 0)
    only_the_host = [parent](const uipc::peer_identity& p) { return p.pid == parent; };
  const detail::protocol_rules rules{[&] { return describe(**h); }, only_the_host, served_here,
                                     &watch_state};
  detail::worker_set workers(threads, threads + 16,
                             [&] { detail::serve_protocol(**svc, (*h)->impl(), rules); });
  workers.start();
  workers.join();
  watch_state.serve_on(nullptr);
  io.stop();
  loop.join();
  return 0;  // `end` unloads the plug-in, then the rest
}
