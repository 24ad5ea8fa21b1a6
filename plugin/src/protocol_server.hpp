// The serving side of runner_protocol: answers list, call and watch requests
// from a caps service with a host's services. A runner serves its plug-in's
// to the host; a host serves its own to each of its runners.
#pragma once

#include <chrono>
#include <functional>
#include <string>

#include "change_watch.hpp"
#include "host_impl.hpp"
#include "uipc/caps/service.hpp"

namespace uipc::plugin::detail {

struct protocol_rules {
  /// The answer to `list` (runner_protocol's listing text).
  std::function<std::string()> describe;
  /// Whether requests of this sender are served; another sender is
  /// disconnected. Empty: every sender the point admits.
  std::function<bool(const peer_identity&)> admit;
  /// Which services a call may reach; others are service_not_found. Empty: all.
  bytes_filter callable;
  /// Where watches wait.
  change_watch* changes = nullptr;
  /// The deadline of each call's context (its waits to enter a cooperative
  /// plug-in, its calls to isolated ones): now + this. Zero: none.
  std::chrono::milliseconds call_timeout{0};
};

/// Serves requests from `svc` until it stops; on as many threads as call it.
void serve_protocol(caps::service& svc, host_impl& host, const protocol_rules& rules);

}  // namespace uipc::plugin::detail
