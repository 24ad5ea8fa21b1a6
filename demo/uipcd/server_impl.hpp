// The inside of uipcd's server, shared by its source files: server.cpp (the
// modules' lifecycle, DNS, reload), control.cpp (the control point) and
// metrics.cpp (the HTTP endpoint).
#pragma once

#include <sys/types.h>

#include <atomic>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/thread_pool.hpp>
#include <chrono>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "server.hpp"
#include "shared_slot.hpp"
#include "stats.hpp"
#include "uipc/caps/service.hpp"
#include "uipc/core/event_loop.hpp"
#include "uipc/dispatch/dispatcher.hpp"
#include "uipc/handles/daemon.hpp"
#include "uipc/plugin/control.hpp"
#include "uipc/plugin/host.hpp"

namespace uipcd {

using clock = std::chrono::steady_clock;

class dns_listener;
class metrics_server;

/// What the DNS path reads per query; replaced whole at a reload.
struct dns_settings {
  std::string service;
  std::chrono::milliseconds timeout;
};

/// A caps point of uipcd's own (control, echo): the service, its clients as
/// its events tell them, and its request latencies.
struct own_point {
  std::unique_ptr<uipc::caps::service> service;
  std::mutex clients_mutex;  // held only to copy or change `clients`
  std::map<uipc::caps::client_id, uipc::peer_identity> clients;
  histogram latency;

  void note_client(const uipc::caps::event& e);
};

/// A plug-in file loaded from the plug-ins directory.
struct loaded_plugin {
  std::string name;
  bool isolated = false;
  dev_t device = 0;
  ino_t inode = 0;
  off_t size = 0;
  std::int64_t modified_ns = 0;
};

struct server::impl {
  impl(config c, config_source s);

  // -- configuration --------------------------------------------------------
  config cfg;  // changed by reloads, on the admin thread only
  config_source source;
  shared_slot<dns_settings> dns;
  std::atomic<std::uint64_t> config_reloads{0};
  mutable std::mutex status_mutex;  // guards the reloadable part of cfg and the strings below
  std::string last_reload_error;    // why the last reload was refused, or ""
  std::vector<std::string> plugin_failures;  // "FILE: why" of the last load or reload
  std::string zone_serving;  // the zone file the zone plug-in took last (an isolated one
                             // restarts with it)

  // -- modules --------------------------------------------------------------
  uipc::event_loop loop;
  clock::time_point started = clock::now();
  std::unique_ptr<uipc::plugin::host> host;
  std::map<std::string, loaded_plugin> plugins;  // by file name; admin thread (or start) only
  std::unique_ptr<uipc::handles::handle_daemon> handles;
  uipc::ref_ptr<uipc::dispatch::dispatcher> dispatcher;
  std::list<dns_listener> listeners;
  std::unique_ptr<uipc::plugin::control> plugin_control;
  own_point control;
  own_point echo;
  std::unique_ptr<metrics_server> metrics;
  boost::asio::thread_pool admin{1};  // reloads and blocking control requests, one at a time
  std::atomic<std::uint32_t> admin_queued{0};  // control requests posted to it, not yet answered
  boost::asio::signal_set signals;
  boost::asio::steady_timer drain_timer;
  std::atomic<bool> draining{false};

  // -- DNS figures ------------------------------------------------------------
  std::atomic<std::uint64_t> dns_in_flight{0};
  std::atomic<std::uint64_t> dns_answered{0};
  std::atomic<std::uint64_t> dns_servfail{0};
  std::atomic<std::uint64_t> dns_dropped{0};
  histogram dns_latency;

  // server.cpp
  int start();
  int run();
  void start_plugins();
  /// Loads, reloads and unloads so that the host runs what the plug-ins
  /// directory holds; records failures. Admin thread (or start).
  void sync_plugins();
  /// SIGHUP and `uipcctl reload`: the configuration, then the plug-ins. Admin thread.
  std::string reload_all();
  /// Tells the zone plug-in which zone to serve; "" or why it refused.
  std::string apply_zone();
  void begin_drain(int signal);
  void drain_step(clock::time_point deadline);
  std::vector<figure> collect() const;
  std::string status_table() const;

  // control.cpp
  uipc::error_code start_points();
  void serve_control();
  void serve_echo();
  std::string clients_table();
  std::string handles_table() const;
};

}  // namespace uipcd
