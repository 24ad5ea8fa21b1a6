// Services another process serves over runner_protocol, registered in a host
// as a record's: a proxy per bytes service that calls it through caps, a
// pointer service listed only (calling it gives service_not_compatible), and
// a watcher thread that follows what the other side registers or drops.
// The host relays an isolated plug-in's services so; a runner relays its
// host's, so that the plug-in it runs calls them as it would in the host.
#pragma once

#include <boost/asio/io_context.hpp>
#include <chrono>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

#include "host_impl.hpp"
#include "runner_protocol.hpp"
#include "uipc/caps/client.hpp"
#include "uipc/caps/point.hpp"

namespace uipc::plugin::detail {

class remote_services {
 public:
  /// `what` names the other side in the log; calls whose context has no
  /// deadline get `call_timeout`, a listing gets `list_timeout`.
  remote_services(host_impl& host, std::string what, std::chrono::milliseconds call_timeout,
                  std::chrono::milliseconds list_timeout);
  ~remote_services();
  remote_services(const remote_services&) = delete;
  remote_services& operator=(const remote_services&) = delete;

  /// The loop clients are made on (never run: their calls block).
  boost::asio::io_context& io() noexcept { return io_; }

  /// Asks `client` what it serves now.
  result<runner_protocol::listing> list(caps::client& client) const;

  /// The connection calls go through from now on, at `address`.
  void connect(std::shared_ptr<caps::client> client, const caps::point_address& address);
  /// No connection (the other side went): calls fail with unavailable.
  void disconnect();

  /// The entries that call what `listed` names: a proxy per bytes service
  /// (one per name for this object's life), pointer services listed only.
  std::vector<relayed_service> entries_for(const runner_protocol::listing& listed);
  /// Publishes `listed` as `record`'s services, then follows the other side's
  /// changes on a thread of its own, until its connection ends or stop().
  /// Nothing when not connected or when a watcher runs already.
  void start_watching(plugin_record& record, runner_protocol::listing listed);
  /// Waits for the watcher (it ends when the connection does).
  void join_watcher();
  /// Ends the watcher now: its pending watch is withdrawn.
  void stop_watching();

  /// Calls bytes service `service` on the other side; `arg` is the caller's
  /// uipc_plugin_bytes_call. The reply is checked and copied into ctx's pool.
  int call(uipc_plugin_context* ctx, const std::string& service, void* arg, std::uint64_t* out);

 private:
  class proxy;
  void watch(plugin_record& record, const caps::point_address& address,
             runner_protocol::listing listed);

  host_impl& host_;
  const std::string what_;
  const std::chrono::milliseconds call_timeout_, list_timeout_;
  boost::asio::io_context io_;

  // Every name the other side ever listed has its proxy for the link's life
  // (published entries point at them), so their number is bounded too.
  static constexpr std::size_t max_proxies = runner_protocol::max_listed_services;
  mutable std::mutex proxies_mutex_;
  std::deque<std::unique_ptr<proxy>> proxies_;  // stable: registered entries point at them
  std::unordered_map<std::string_view, proxy*> proxy_index_;  // keys: the proxies' names

  mutable std::mutex mutex_;
  std::shared_ptr<caps::client> client_;
  caps::point_address address_{};
  std::thread watcher_;
  bool stop_ = false;                           // stop_watching() was called
  std::shared_ptr<caps::client> watch_client_;  // the watcher's own connection
  std::optional<caps::message_id> watch_id_;    // its watch in flight
};

}  // namespace uipc::plugin::detail
