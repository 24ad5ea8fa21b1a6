// uipcd's server: bringing the modules up and down, DNS answered by a plug-in,
// reloads, and the figures.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <boost/asio/post.hpp>
#include <cstdio>
#include <filesystem>
#include <future>

#include "dns_message.hpp"
#include "metrics.hpp"
#include "program_args.hpp"
#include "server_impl.hpp"
#include "uipc/core/framed.hpp"

namespace uipcd {

namespace fs = std::filesystem;
namespace dispatch = uipc::dispatch;

// -- configuration ------------------------------------------------------------

std::string load_config(const config_source& source, config& out) {
  config c;
  if (!source.path.empty()) {
    if (auto why = apply_file(c, source.path); !why.empty()) return why;
  }
  for (const auto& [key, value] : source.overrides) {
    if (auto why = set(c, key, value); !why.empty()) return key + ": " + why;
  }
  out = std::move(c);
  return {};
}

namespace {

void log(const std::string& line) { std::fprintf(stderr, "uipcd: %s\n", line.c_str()); }

std::string endpoint_text(const dispatch::udp::endpoint& e) {
  const auto a = e.address().to_string();
  return (e.address().is_v6() ? "[" + a + "]" : a) + ":" + std::to_string(e.port());
}

// The example plug-ins of this build (bin/../plugins) or install (lib/uipc/plugins).
std::string default_plugins_directory() {
  std::error_code ec;
  const fs::path self = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    const fs::path beside = self.parent_path().parent_path() / "plugins";
    if (fs::is_directory(beside, ec)) return beside.string();
  }
  return UIPCD_INSTALLED_PLUGINS;
}

// The shared objects of a directory, by file name (sorted: loads go in name order).
std::map<std::string, fs::path> plugin_files(const std::string& directory) {
  std::map<std::string, fs::path> out;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(directory, ec))
    if (entry.path().extension() == ".so") out.emplace(entry.path().stem().string(), entry.path());
  return out;
}

bool same_file(const loaded_plugin& p, const struct stat& st) {
  return p.device == st.st_dev && p.inode == st.st_ino && p.size == st.st_size &&
         p.modified_ns == std::int64_t{st.st_mtim.tv_sec} * 1000000000 + st.st_mtim.tv_nsec;
}

void remember_file(loaded_plugin& p, const struct stat& st) {
  p.device = st.st_dev;
  p.inode = st.st_ino;
  p.size = st.st_size;
  p.modified_ns = std::int64_t{st.st_mtim.tv_sec} * 1000000000 + st.st_mtim.tv_nsec;
}

}  // namespace

// -- DNS: each query answered by the plug-in service, in a context of its own --

class dns_listener {
 public:
  dns_listener(server::impl& s, dispatch::listener l) : s_(s), listener_(std::move(l)) {}
  void start() {
    listener_.async_receive([this](uipc::error_code ec, dispatch::event ev) { on_event(ec, ev); });
  }
  void stop() noexcept { listener_.detach(); }

 private:
  void on_event(uipc::error_code ec, dispatch::event& ev) {
    if (ec == dispatch::errc::no_buffers) {
      s_.dns_dropped.fetch_add(1, std::memory_order_relaxed);
    } else if (ec) {
      ev.release();
      listener_.detach();  // shut down: no other handler uses it now
      return;
    } else {
      answer(ev);
    }
    ev.release();
    start();
  }

  void answer(dispatch::event& ev) {
    const auto began = clock::now();
    s_.dns_in_flight.fetch_add(1, std::memory_order_relaxed);
    const std::shared_ptr<const dns_settings> settings = s_.dns.load();
    const std::span<std::byte> room(ev.data().data(), ev.capacity());
    const std::size_t length = ev.data().size();
    bool answered = false;
    bool dropped = false;
    {
      auto ctx = s_.host->new_context();  // its pool holds the answer until it ends
      if (ctx) {
        ctx->set_deadline(began + settings->timeout);
        std::uint64_t code = 0;
        auto r = ctx->call_bytes(settings->service, ev.data(), &code);
        if (r && r->empty()) {
          dropped = true;  // the service says: not a query to answer
        } else if (r && r->size() <= room.size()) {
          answered = static_cast<bool>(listener_.reply(std::move(ev), *r));
          dropped = !answered;  // shutting down: the event is gone either way
        }
      }
    }
    if (!answered && !dropped) {  // the service failed, timed out, or its answer did not fit
      const std::size_t n = uipc::dns::error_in_place(room, length, uipc::dns::rcode_servfail);
      if (n != 0 && listener_.reply(std::move(ev), room.first(n))) {
        s_.dns_servfail.fetch_add(1, std::memory_order_relaxed);
      } else {
        dropped = true;
      }
    }
    (dropped ? s_.dns_dropped : s_.dns_answered).fetch_add(1, std::memory_order_relaxed);
    s_.dns_latency.record(clock::now() - began);
    s_.dns_in_flight.fetch_sub(1, std::memory_order_relaxed);
  }

  server::impl& s_;
  dispatch::listener listener_;
};

// -- lifecycle ------------------------------------------------------------------

server::impl::impl(config c, config_source s)
    : cfg(std::move(c)),
      source(std::move(s)),
      loop(cfg.threads, /*catch_signals=*/false),
      signals(loop.context(), SIGINT, SIGTERM, SIGHUP),
      drain_timer(loop.context()) {
  if (cfg.plugins_directory.empty()) cfg.plugins_directory = default_plugins_directory();
  dns.store(std::make_shared<const dns_settings>(dns_settings{cfg.dns_service, cfg.dns_timeout}));
}

server::server(config c, config_source source)
    : impl_(std::make_unique<impl>(std::move(c), std::move(source))) {}

server::~server() = default;

int server::start() { return impl_->start(); }
int server::run() { return impl_->run(); }

void server::impl::start_plugins() {
  uipc::plugin::host_options options;
  options.log = [](int level, std::string_view text) {
    // Errors and warnings (crashes, restarts); loads are logged by sync_plugins.
    if (level <= 1)
      std::fprintf(stderr, "uipcd: plugins: %.*s\n", static_cast<int>(text.size()), text.data());
  };
  auto h = uipc::plugin::host::create(options);
  if (!h) throw std::runtime_error("plug-in host: " + h.error().message());
  host = std::move(*h);
  sync_plugins();
}

void server::impl::sync_plugins() {
  const auto files = plugin_files(cfg.plugins_directory);
  std::vector<std::string> failures;
  uipc::plugin::isolation_options isolation;
  isolation.directory = cfg.caps_directory;
  // The zone plug-in reads its zone at Init from the environment: a process
  // of its own starts (and restarts after a crash) with the zone that serves
  // now, not the one uipcd started with, and answers no query from the old.
  isolation.environment = [this] {
    std::lock_guard lock(status_mutex);
    return std::vector<std::string>{"UIPC_DNS_ZONE=" + zone_serving};
  };
  auto load = [&](const std::string& file, const fs::path& path, bool isolated,
                  const struct stat& st) {
    auto name = isolated ? host->load_isolated(path, isolation) : host->load(path);
    if (!name) {
      failures.push_back(file + ".so: " + name.error().message());
      log("plugins: " + path.string() + ": " + name.error().message() + " (skipped)");
      return;
    }
    loaded_plugin p{*name, isolated};
    remember_file(p, st);
    plugins[file] = p;
    log("plugins: loaded " + *name + " from " + path.string() + (isolated ? " (isolated)" : ""));
  };
  for (auto it = plugins.begin(); it != plugins.end();) {  // gone from the directory: unloaded
    if (files.count(it->first) != 0) {
      ++it;
      continue;
    }
    (void)host->unload(it->second.name);
    log("plugins: unloaded " + it->second.name + " (its file is gone)");
    it = plugins.erase(it);
  }
  for (const auto& [file, path] : files) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) continue;
    const bool isolated =
        std::find(cfg.isolate.begin(), cfg.isolate.end(), file) != cfg.isolate.end();
    auto it = plugins.find(file);
    if (it == plugins.end()) {
      load(file, path, isolated, st);
    } else if (it->second.isolated != isolated) {  // moved in or out of a process of its own
      (void)host->unload(it->second.name);
      plugins.erase(it);
      load(file, path, isolated, st);
    } else if (!same_file(it->second, st)) {  // a new build: calls in flight finish in the old one
      if (auto ec = host->reload(it->second.name, path)) {
        failures.push_back(file + ".so: " + ec.message());
        log("plugins: reload of " + it->second.name +
            " failed, the old build serves on: " + ec.message());
      } else {
        remember_file(it->second, st);
        log("plugins: reloaded " + it->second.name + " from " + path.string());
      }
    }
  }
  std::lock_guard lock(status_mutex);
  plugin_failures = std::move(failures);
}

std::string server::impl::apply_zone() {
  if (!host->service_flags("dns zone")) return {};  // no zone plug-in: nothing to tell
  auto ctx = host->new_context();
  if (!ctx) return ctx.error().message();
  ctx->set_deadline(clock::now() + std::chrono::seconds(10));
  std::uint64_t status = 0;
  auto r = ctx->call_bytes(
      "dns zone", std::as_bytes(std::span(cfg.dns_zone.data(), cfg.dns_zone.size())), &status);
  if (!r) return "dns zone: " + r.error().message();
  const std::string text(reinterpret_cast<const char*>(r->data()), r->size());
  if (status != 0) return text.rfind("error\t", 0) == 0 ? text.substr(6) : text;
  {
    std::lock_guard lock(status_mutex);
    zone_serving = cfg.dns_zone;
  }
  log("dns: " + text);
  return {};
}

int server::impl::start() {
  ::signal(SIGPIPE, SIG_IGN);
  // The zone plug-in reads its zone at init from the environment: set it now,
  // while this is the only thread (isolated plug-ins inherit it).
  if (!cfg.dns_zone.empty()) ::setenv("UIPC_DNS_ZONE", cfg.dns_zone.c_str(), 1);
  zone_serving = cfg.dns_zone;
  // The handle daemon first: it takes its name at once, so a client that
  // looks for it while the plug-ins load (an isolated one takes a process
  // start) finds it instead of starting one of its own.
  if (cfg.handles) {
    uipc::handles::daemon_options o;
    o.where.directory = cfg.handles_directory;
    o.where.name = cfg.handles_name;
    o.capacity = cfg.handles_capacity;
    o.scratch_size = static_cast<std::size_t>(cfg.handles_scratch);
    auto d = uipc::handles::handle_daemon::start(loop.context(), std::move(o));
    if (!d) {
      log("cannot start the handle daemon (" + cfg.handles_name + "): " + d.error().message());
      return exit_cannot_start;
    }
    handles = std::move(*d);
    std::printf("handles: %s\n", handles->where().socket_path.c_str());
  }

  try {
    start_plugins();
  } catch (const std::exception& e) {
    log(std::string("cannot start: ") + e.what());
    return exit_cannot_start;
  }

  if (cfg.dns) {
    auto local = uipc::dns::parse_endpoint(cfg.dns_listen);
    if (!local) {
      log("dns.listen: '" + cfg.dns_listen + "' is not an IPv4 or IPv6 address with a port");
      return exit_bad_config;
    }
    dispatch::dispatcher_options o;
    o.sockets = cfg.threads;
    o.buffers = cfg.dns_buffers;
    o.buffer_size = 1232;
    o.socket_buffer_bytes = 4 << 20;
    auto d = dispatch::dispatcher::create(loop.context(), *local, o);
    if (!d) {
      log("cannot serve DNS on " + cfg.dns_listen + ": " + d.error().message());
      return exit_cannot_start;
    }
    dispatcher = *d;
    for (unsigned i = 0; i < cfg.threads; ++i) {
      auto l = dispatcher->add_listener();
      if (!l) {
        log("dns: " + l.error().message());
        return exit_cannot_start;
      }
      listeners.emplace_back(*this, std::move(*l)).start();
    }
    std::printf("dns: %s\n", endpoint_text(dispatcher->local_endpoint()).c_str());
  }

  if (auto ec = start_points()) return exit_cannot_start;  // start_points says why

  if (!cfg.metrics.empty()) {
    auto m = metrics_server::start(loop.context(), cfg.metrics,
                                   [this] { return prometheus_text(collect()); });
    if (!m) {
      log("cannot serve metrics on " + cfg.metrics + ": " + m.error().message());
      return exit_cannot_start;
    }
    metrics = std::move(*m);
    std::printf("metrics: http://%s/metrics\n", metrics->address().c_str());
  }

  // Stopping: newest hook first — metrics, points, DNS, then the handle daemon.
  loop.on_stop([this] {
    if (handles) handles->stop();
  });
  loop.on_stop([this] {
    if (dispatcher) dispatcher->shutdown();  // each listener detaches at its shutdown event
  });
  loop.on_stop([this] {
    if (control.service) control.service->stop();
    if (echo.service) echo.service->stop();
    if (plugin_control) plugin_control->stop();  // waits for a request it is answering
    if (metrics) metrics->stop();
    signals.cancel();
    drain_timer.cancel();
  });
  for (const auto& path : uipc::untaken_passed_sockets())
    log("the service manager passed a socket for '" + path + "', which uipcd does not serve");
  std::printf("uipcd: serving\n");
  std::fflush(stdout);
  return exit_ok;
}

void server::impl::begin_drain(int signal) {
  if (draining.exchange(true)) return;
  log(std::string("stopping (") + (signal == SIGINT ? "SIGINT" : "SIGTERM") +
      "): draining work in flight");
  // Queries that arrive from now on stay unread (their clients retry or time
  // out, as with any server that stops); every one read so far is answered.
  if (dispatcher) dispatcher->stop_receiving();
  std::chrono::milliseconds drain;
  {
    std::lock_guard lock(status_mutex);  // a reload on the admin thread may be changing it
    drain = cfg.drain;
  }
  drain_step(clock::now() + drain);
}

// Every 2 ms: done once no query is being answered or waits in the queue, or
// at the deadline; then the loop stops (its hooks stop every module).
void server::impl::drain_step(clock::time_point deadline) {
  // Idle: every datagram read was answered or dropped (a batch being delivered
  // is in neither the queue nor in flight, so count, not look). The dispatcher
  // reads no more since begin_drain, so `received` is final.
  bool idle = true;
  if (dispatcher) {
    const auto d = dispatcher->stats();
    const std::uint64_t dealt = dns_answered.load() + dns_dropped.load() + d.dropped_short +
                                d.dropped_no_listener + d.dropped_queue_full + d.dropped_no_memory;
    idle = dns_in_flight.load() == 0 && d.queued_queries == 0 && dealt >= d.received;
  }
  if (idle || clock::now() >= deadline) {
    if (!idle) log("drain: the deadline passed with work in flight");
    loop.stop();
    return;
  }
  drain_timer.expires_after(std::chrono::milliseconds(2));
  drain_timer.async_wait([this, deadline](boost::system::error_code ec) {
    if (!ec) drain_step(deadline);
  });
}

int server::impl::run() {
  std::function<void()> wait_signal = [this, &wait_signal] {
    signals.async_wait([this, &wait_signal](boost::system::error_code ec, int signal) {
      if (ec) return;
      if (signal != SIGHUP)
        return begin_drain(signal);  // no new wait: the stop hook may have run already
      boost::asio::post(admin, [this] { (void)reload_all(); });
      wait_signal();
    });
  };
  wait_signal();
  loop.run();
  // The loop has stopped: no query is answered any more. Requests queued on
  // the admin thread finish; then the listeners go, then the plug-ins.
  admin.join();
  for (auto& l : listeners) l.stop();
  loop.context().restart();
  loop.context().poll();  // the cancelled operations' handlers run (they use the listeners)
  listeners.clear();
  if (dispatcher) {
    // Every query read was answered (servfail included) or dropped as not one.
    log("stopped; DNS received " + std::to_string(dispatcher->stats().received) + " answered " +
        std::to_string(dns_answered.load()) + " servfail " + std::to_string(dns_servfail.load()) +
        " dropped " + std::to_string(dns_dropped.load()));
  } else {
    log("stopped");
  }
  dispatcher.reset();
  handles.reset();
  host.reset();  // Shutdown of every plug-in, once their calls have ended
  return exit_ok;
}

std::string server::impl::reload_all() {
  config next;
  if (auto why = load_config(source, next); !why.empty()) {
    log("reload refused, the running configuration stays: " + why);
    std::lock_guard lock(status_mutex);
    return last_reload_error = why;
  }
  if (next.plugins_directory.empty()) next.plugins_directory = default_plugins_directory();
  std::vector<std::string> later;
  {
    std::lock_guard lock(status_mutex);  // status_table() reads cfg on the loop
    later = adopt_reloadable(cfg, next);
  }
  for (const auto& key : later)
    log("reload: " + key + " changed; it takes effect at the next start");
  dns.store(std::make_shared<const dns_settings>(dns_settings{cfg.dns_service, cfg.dns_timeout}));
  sync_plugins();
  std::string why = apply_zone();
  if (!why.empty()) log("reload: the zone was refused, the old one serves on: " + why);
  config_reloads.fetch_add(1, std::memory_order_relaxed);
  log("reloaded" + (source.path.empty() ? std::string() : " " + source.path));
  std::lock_guard lock(status_mutex);
  return last_reload_error = why;
}

// -- figures ----------------------------------------------------------------------

std::vector<figure> server::impl::collect() const {
  std::vector<figure> rows;
  auto add = [&rows](const char* module, const char* name, std::uint64_t value, bool counter = true,
                     std::string label = {}) {
    rows.push_back({module, name, std::move(label), value, counter});
  };
  auto latencies = [&add](const char* module, const histogram& h) {
    add(module, "latency_ns", h.percentile(0.5), false, "p50");
    add(module, "latency_ns", h.percentile(0.9), false, "p90");
    add(module, "latency_ns", h.percentile(0.99), false, "p99");
  };
  add("server", "uptime_s",
      static_cast<std::uint64_t>(
          std::chrono::duration_cast<std::chrono::seconds>(clock::now() - started).count()),
      false);
  add("server", "threads", loop.threads(), false);
  add("server", "config_reloads", config_reloads.load());

  if (handles) {
    const auto h = handles->stats();
    add("handles", "capacity", h.capacity, false);
    add("handles", "handles_in_use", h.handles_in_use, false);
    add("handles", "clients", h.clients, false);
    add("handles", "scratch_bytes", h.scratch_size, false);
    add("handles", "scratch_in_use", h.scratch_in_use, false);
    add("handles", "requests", h.requests);
    add("handles", "errors", h.errors);
    add("handles", "mutexes_abandoned", h.mutexes_abandoned);
  }
  if (dispatcher) {
    const auto d = dispatcher->stats();
    add("dns", "received", d.received);
    add("dns", "answered", dns_answered.load());
    add("dns", "servfail", dns_servfail.load());
    add("dns", "dropped", dns_dropped.load());
    add("dns", "dropped_short", d.dropped_short);
    add("dns", "dropped_queue_full", d.dropped_queue_full);
    add("dns", "no_buffer_events", d.no_buffer_events);
    add("dns", "send_errors", d.send_errors);
    add("dns", "in_flight", dns_in_flight.load(), false);
    add("dns", "queued_queries", d.queued_queries, false);
    add("dns", "buffers_in_use", d.buffers_in_use, false);
    add("dns", "buffers", cfg.dns_buffers, false);
    latencies("dns", dns_latency);
  }
  for (const own_point* p : {&control, &echo}) {
    if (!p->service) continue;
    const auto c = p->service->stats();
    const std::string& point = p->service->name();
    add("caps", "clients", c.clients, false, point);
    add("caps", "clients_total", c.clients_total, true, point);
    add("caps", "requests", c.requests, true, point);
    add("caps", "replies", c.replies, true, point);
    add("caps", "protocol_violations", c.protocol_violations, true, point);
    add("caps", "refusals", c.refusals, true, point);
    add("caps", "latency_ns", p->latency.percentile(0.5), false, point + " p50");
    add("caps", "latency_ns", p->latency.percentile(0.99), false, point + " p99");
  }
  if (host) {
    const auto s = host->stats();
    const auto list = host->plugins();
    std::uint64_t services = 0, isolated = 0, running = 0, crashes = 0;
    for (const auto& p : list) {
      services += p.services.size();
      isolated += p.isolated;
      running += p.state == "running";
      crashes += p.crashes;
    }
    add("plugins", "plugins", list.size(), false);
    add("plugins", "running", running, false);
    add("plugins", "isolated", isolated, false);
    add("plugins", "services", services, false);
    add("plugins", "calls", s.calls);
    add("plugins", "failed_calls", s.failed_calls);
    add("plugins", "crashes", crashes);
    add("plugins", "reloads", s.reloads);
    add("plugins", "contexts_alive", s.contexts_alive, false);
    add("plugins", "pool_bytes_cached", s.pool_bytes_cached, false);
    add("plugins", "retired_pending", s.retired_pending, false);
  }
  return rows;
}

std::string server::impl::status_table() const {
  std::string out = "KEY\tVALUE\n";
  auto row = [&out](const char* key, std::string value) {
    std::replace_if(
        value.begin(), value.end(), [](char c) { return c == '\t' || c == '\n'; }, ' ');
    out += std::string(key) + '\t' + value + '\n';
  };
  row("pid", std::to_string(::getpid()));
  row("state", draining.load() ? "draining" : "serving");
  row("uptime_s",
      std::to_string(
          std::chrono::duration_cast<std::chrono::seconds>(clock::now() - started).count()));
  row("threads", std::to_string(loop.threads()));
  row("config", source.path.empty() ? "-" : source.path);
  row("handles", handles ? handles->where().socket_path : "off");
  row("dns", dispatcher ? endpoint_text(dispatcher->local_endpoint()) : "off");
  row("control", control.service ? control.service->name() : "-");
  row("echo", echo.service ? echo.service->name() : "off");
  row("metrics", metrics ? "http://" + metrics->address() + "/metrics" : "off");
  std::lock_guard lock(status_mutex);
  row("plugins_directory", cfg.plugins_directory);
  row("last_reload_error", last_reload_error.empty() ? "-" : last_reload_error);
  for (const auto& f : plugin_failures) row("plugin_failure", f);
  return out;
}

}  // namespace uipcd
