// uipc-plugin-runner: runs one plug-in in a process of its own for a host
// (host::load_isolated starts it): loads the shared object into a host of its
// own and serves its bytes services on a caps point (src/runner_protocol.hpp).
// A plug-in that crashes takes this process down, not the host.
#include <sys/prctl.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "runner_protocol.hpp"
#include "uipc/caps/service.hpp"
#include "uipc/plugin/host.hpp"

namespace {

namespace proto = uipc::plugin::detail::runner_protocol;

int usage(int status) {
  std::fprintf(
      status ? stderr : stdout,
      "usage: uipc-plugin-runner --point NAME [--dir DIR] [--parent PID] [--threads N] PLUGIN.so\n"
      "Runs one plug-in for a uipc plug-in host, serving its bytes services on the caps\n"
      "point NAME (of this user; DIR: the rendezvous directory). With --parent, ends\n"
      "when that process (the host) does.\n"
      "Exit status: 0 stopped by SIGTERM or SIGINT; 1 the plug-in did not load;\n"
      "2 the point could not be registered; 64 usage.\n");
  return status;
}

// Services registered or gone in this runner's host after Init, for the
// host's watch requests (a long poll: answered when something changed).
class change_watch {
 public:
  std::uint64_t version() const noexcept { return version_.load(std::memory_order_acquire); }

  /// Where watches are answered; null before the service is up and once it
  /// is going (a plug-in's Shutdown may still unregister services then).
  void serve_on(uipc::caps::service* svc) {
    std::lock_guard lock(mutex_);
    svc_ = svc;
    if (svc == nullptr) pending_.clear();
  }

  /// A service came or went: every pending watch is answered.
  void changed() {
    version_.fetch_add(1, std::memory_order_acq_rel);
    // Answered under the lock, so that serve_on(nullptr) waits for it before
    // the service goes (reply() is the service's code, not a plug-in's).
    std::lock_guard lock(mutex_);
    if (svc_ != nullptr)
      for (const auto& w : pending_) answer(*svc_, w.client, w.id);
    pending_.clear();
  }

  /// A watch of `known`: answered now when the version moved on since, else
  /// at the next change. (The version is read under the lock that changed()
  /// takes after moving it, so no change is missed between.)
  void watch(uipc::caps::service& svc, uipc::caps::client_id client, uipc::caps::message_id id,
             std::uint64_t known) {
    {
      std::lock_guard lock(mutex_);
      if (version() == known) {
        pending_.push_back({client, id});
        return;
      }
    }
    answer(svc, client, id);
  }

 private:
  struct waiting {
    uipc::caps::client_id client;
    uipc::caps::message_id id;
  };
  void answer(uipc::caps::service& svc, uipc::caps::client_id client, uipc::caps::message_id id) {
    const std::uint64_t v = version();
    // A host that went away meanwhile: nothing to answer.
    (void)svc.reply(client, id, std::as_bytes(std::span(&v, 1)));
  }

  std::atomic<std::uint64_t> version_{0};
  std::mutex mutex_;
  std::vector<waiting> pending_;
  uipc::caps::service* svc_ = nullptr;
};

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

std::string describe(uipc::plugin::host& h) {
  // The version first: a change while listing makes the host's next watch
  // return at once, so it lists again.
  std::string out;
  const std::string version = "version\t" + std::to_string(watch_state.version()) + "\t0\n";
  for (const auto& p : h.plugins()) {
    if (p.name == watcher_name) continue;
    out += "plugin\t" + p.name + "\t" + std::to_string(p.preemptive ? UIPC_PLUGIN_PREEMPTIVE : 0) +
           "\n";
    for (const auto& s : p.services) {
      auto flags = h.service_flags(s);
      out += "service\t" + s + "\t" + std::to_string(flags ? *flags : 0u) + "\n";
    }
  }
  return out + version;
}

void serve(uipc::caps::service& svc, uipc::plugin::host& h) {
  for (;;) {
    auto e = svc.receive();
    if (!e) return;  // stopped
    if (e->kind != uipc::caps::event_kind::request) continue;
    const std::string request = e->copy();  // the channel is the client's to write: copy first
    auto parsed = proto::parse(std::as_bytes(std::span(request.data(), request.size())));
    if (!parsed) {
      (void)svc.reject(e->client, e->id, uipc::caps::errc::protocol_violation);
      continue;
    }
    if (parsed->kind == proto::list) {
      (void)svc.reply(e->client, e->id, describe(h));
      continue;
    }
    if (parsed->kind == proto::watch) {
      watch_state.watch(svc, e->client, e->id, proto::get_version(parsed->payload));
      continue;
    }
    std::int32_t status = UIPC_PLUGIN_OK;
    std::uint64_t value = 0;
    std::span<const std::byte> answer;
    auto ctx = h.new_context();
    if (!ctx) {
      status = UIPC_PLUGIN_E_TOO_MANY;
    } else {
      auto r = ctx->call_bytes(parsed->name, parsed->payload, &value);
      if (r)
        answer = *r;
      else
        status = r.error().category() == uipc::plugin::plugin_category()
                     ? r.error().value()
                     : UIPC_PLUGIN_E_PLUGIN_FAILED;
    }
    auto sent = svc.reply_in_place(
        e->client, e->id, proto::reply_header + answer.size(), [&](std::span<std::byte> b) {
          proto::put_header(b, status, value);
          if (!answer.empty())
            std::memcpy(b.data() + proto::reply_header, answer.data(), answer.size());
        });
    if (sent == uipc::caps::errc::message_too_large) {
      auto small = svc.reply_in_place(
          e->client, e->id, proto::reply_header,
          [&](std::span<std::byte> b) { proto::put_header(b, UIPC_PLUGIN_E_NO_MEMORY, 0); });
      (void)small;
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string point, dir, plugin;
  long parent = 0;
  unsigned threads = 2;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--point" && i + 1 < argc)
      point = argv[++i];
    else if (arg == "--dir" && i + 1 < argc)
      dir = argv[++i];
    else if (arg == "--parent" && i + 1 < argc)
      parent = std::strtol(argv[++i], nullptr, 10);
    else if (arg == "--threads" && i + 1 < argc)
      threads = static_cast<unsigned>(std::strtoul(argv[++i], nullptr, 10));
    else if (arg == "--help" || arg == "-h")
      return usage(0);
    else if (!arg.empty() && arg[0] != '-' && plugin.empty())
      plugin = arg;
    else
      return usage(64);
  }
  if (point.empty() || plugin.empty() || threads == 0 || threads > 64) return usage(64);
  if (parent > 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (::getppid() != parent) return 1;  // the host is gone already
  }

  auto h = uipc::plugin::host::create();
  if (!h) return 1;
  if (!(*h)->load(watcher_entry)) return 1;
  auto loaded = (*h)->load(plugin);
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
  std::vector<std::thread> workers;
  for (unsigned t = 0; t < threads; ++t) workers.emplace_back([&] { serve(**svc, **h); });
  for (auto& w : workers) w.join();
  watch_state.serve_on(nullptr);
  io.stop();
  loop.join();
  return 0;  // the host's destructor sends Shutdown
}
