// uipcd's server: every module on one event loop — the handle daemon, a DNS
// responder whose answers come from a plug-in service, the plug-in host (some
// plug-ins isolated in processes of their own), caps points (the control
// point, the plug-in host's point, an echo point) and the metrics endpoint.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "config.hpp"

namespace uipcd {

/// Exit statuses of uipcd.
inline constexpr int exit_ok = 0;
inline constexpr int exit_cannot_start =
    1;  ///< a module could not start (a port or point taken, ...)
inline constexpr int exit_bad_config = 2;
inline constexpr int exit_usage = 64;

/// Where the configuration came from, so a reload can read it again.
struct config_source {
  std::string path;  ///< empty: no file
  std::vector<std::pair<std::string, std::string>>
      overrides;  ///< the flags' key = value, applied over the file
};

/// Reads the configuration: defaults, then the file, then the overrides.
/// Returns an empty string, or why it is refused.
std::string load_config(const config_source& source, config& out);

class server {
 public:
  server(config c, config_source source);
  ~server();
  server(const server&) = delete;
  server& operator=(const server&) = delete;

  /// Brings every module up, printing what it serves on stdout (one line per
  /// module, then "uipcd: serving"); on failure prints why on stderr and
  /// returns the exit status.
  int start();
  /// Serves until SIGTERM or SIGINT (draining work in flight first); SIGHUP
  /// reloads the configuration and the plug-ins. Returns the exit status.
  int run();

  struct impl;

 private:
  std::unique_ptr<impl> impl_;
};

}  // namespace uipcd
