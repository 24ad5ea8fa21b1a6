// uipcd's metrics endpoint: the figures in the Prometheus text format over
// HTTP on loopback (Boost.Beast, kept out of this header).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "stats.hpp"
#include "uipc/core/error.hpp"

namespace boost::asio {
class io_context;
}

namespace uipcd {

/// The rows in the Prometheus text exposition format (version 0.0.4): one
/// family per module and name, `uipc_<module>_<name>`, durations in seconds,
/// labels for points and quantiles.
std::string prometheus_text(const std::vector<figure>& rows);

/// Serves GET /metrics (and nothing else: 404, 405) until stop(). Each
/// connection gets one answer and is closed; a request that is not read
/// within 5 s, or is larger than 8 KiB, is dropped.
class metrics_server {
 public:
  /// `listen`: ADDRESS:PORT on loopback (port 0: any free one). Errors: the
  /// system's, invalid_argument for an address that is not loopback.
  static uipc::result<std::unique_ptr<metrics_server>> start(boost::asio::io_context& io,
                                                             const std::string& listen,
                                                             std::function<std::string()> render);
  ~metrics_server();
  /// Closes the listening socket and every connection. Idempotent; any thread.
  void stop();
  /// "ADDRESS:PORT" as bound.
  std::string address() const;

  struct impl;

 private:
  explicit metrics_server(std::shared_ptr<impl> p);
  std::shared_ptr<impl> impl_;
};

}  // namespace uipcd
