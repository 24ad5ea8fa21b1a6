// The control service of a plug-in host: a caps point through which
// `uipcctl plugins` and `uipcctl services` (or any caps client of the host's
// user) list the plug-ins and services, read the counters, call a bytes
// service and reload a plug-in, while the host serves.
//
// The protocol, one request per call, text:
//   "plugins"                    one row per plug-in
//   "services"                   one row per registered service
//   "stats"                      one row per counter: name, value
//   "reload\tNAME"               reloads plug-in NAME from its file
//   "call\tSERVICE\tBYTES"       calls bytes service SERVICE with BYTES
// The reply is "ok\n" and the body, or "error\t<reason>\n". Rows are
// TAB-separated fields, the first row naming the columns; no field holds a
// TAB or a line break (names cannot, paths and reasons have them replaced).
// The body of a call is the service's reply bytes as they are.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <string_view>

#include "uipc/plugin/error.hpp"

namespace boost::asio {
class io_context;
}

namespace uipc::plugin {

class host;

/// The point a host's control service registers unless told otherwise.
inline constexpr std::string_view default_control_point = "uipc.plugins";

/// How a control service serves.
struct control_options {
  /// The caps point; only processes of the host's user may connect.
  std::string point{default_control_point};
  /// Where points live; empty: the shared rendezvous directory.
  std::string directory;
  /// The deadline of a "call" request.
  std::chrono::milliseconds call_timeout{std::chrono::seconds(5)};
};

/// The reply to one control request for `h`: "ok\n" and the body, or
/// "error\t<reason>\n". Any bytes are a request: what is not one of the
/// verbs gets an error and changes nothing. For a server that carries the
/// protocol on a point of its own (uipcd's uipc.control); `control` uses it.
/// A "reload" runs the new build's Register and Init and a "call" may wait
/// up to `call_timeout`: call it where blocking is fine.
std::string control_answer(host& h, std::string_view request,
                           std::chrono::milliseconds call_timeout);

/// Serves the control protocol for one host.
///
/// Requests are handled one at a time on a thread of the service's own, so a
/// reload (which runs the new build's Register and Init) never stalls the
/// event loop. Requests are untrusted: a malformed one gets an error reply
/// and changes nothing. The io_context must be run by someone (it serves the
/// caps control line) and, like the host, outlive the service.
class control {
 public:
  /// Registers the point and starts serving. Errors: those of registering a
  /// caps point (invalid_name, name_taken, ...).
  static result<std::unique_ptr<control>> start(boost::asio::io_context& io, host& h,
                                                control_options options = {});
  ~control();
  control(const control&) = delete;
  control& operator=(const control&) = delete;

  /// Unregisters the point and waits for a request in progress to end. Idempotent.
  void stop();
  /// Requests answered (errors included).
  std::uint64_t requests() const noexcept;

  struct impl;

 private:
  explicit control(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

}  // namespace uipc::plugin
