// Typed requests: a protobuf message per frame type, on both ends. A server
// registers one handler per request type with a request_router; a client calls
// with typed_call (blocking) or async_typed_call (on the loop). Parsing,
// serializing and the mapping of errors onto the wire happen here, once.
//
// The message types are template parameters: this header needs only the
// generated header of the caller's messages, never protobuf's own.
#pragma once

#include <boost/asio/compose.hpp>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "uipc/core/blocking_connection.hpp"
#include "uipc/core/error.hpp"
#include "uipc/core/framed.hpp"

namespace uipc {

class server_session;

/// What a handler sees of the request it serves.
struct request_context {
  server_session& session;
  const frame& request;
  /// Descriptors to pass with the reply (SCM_RIGHTS); ignored for notices.
  std::vector<unique_fd> reply_fds;

  bool is_notice() const noexcept { return request.kind == frame_kind::notice; }
};

/// The codes a router answers with where no handler decides. Modules whose
/// protocol predates the kit keep their own codes here.
struct router_errors {
  error_code bad_request = make_error_code(errc::bad_request);          ///< payload does not parse
  error_code unknown_request = make_error_code(errc::unknown_request);  ///< no handler for the type
  error_code reply_too_large =
      make_error_code(errc::frame_too_large);  ///< reply over the frame limit
};

/// Maps frame types to typed handlers. Build it before the server starts;
/// afterwards it is only read, from any number of threads.
class request_router {
 public:
  /// Whether a type is also served when it arrives as a notice (no reply sent:
  /// a close from a destructor, say). Other notices count as errors.
  enum class notices { refused, served };

  explicit request_router(router_errors errors = {}) : errors_(std::move(errors)) {}

  /// Serves `type` with `fn`, called as `result<Reply> fn(request_context&, const Request&)`.
  /// A request whose payload does not parse as Request is answered with
  /// router_errors::bad_request and never reaches `fn`; an error from `fn` goes
  /// back as the reply's error. A second handler for one type replaces the first.
  template <class Request, class Reply, class Fn>
  void on(std::uint32_t type, Fn fn, notices n = notices::refused) {
    add(type, n, [fn = std::move(fn)](request_context& ctx) -> result<std::string> {
      Request in;
      if (!in.ParseFromString(ctx.request.payload)) return make_error_code(errc::bad_request);
      result<Reply> out = fn(ctx, static_cast<const Request&>(in));
      if (!out) return out.error();
      return out->SerializeAsString();
    });
  }

  /// Serves one frame: the reply to send for a request, nothing for a notice.
  /// `failed` tells whether it ended in an error (for the server's counters).
  std::optional<frame> serve(server_session& session, const frame& f, bool& failed) const;

  const router_errors& errors() const noexcept { return errors_; }

 private:
  using erased = std::function<result<std::string>(request_context&)>;
  struct entry {
    std::uint32_t type;
    notices accepts;
    erased handler;
  };
  void add(std::uint32_t type, notices n, erased handler);
  const entry* find(std::uint32_t type) const noexcept;

  router_errors errors_;
  std::vector<entry> entries_;  // sorted by type
};

/// The payload of `reply` as Reply; errc::bad_reply when it does not parse
/// (the peer broke the protocol: the caller's request was fine).
template <class Reply>
result<Reply> parse_reply(const frame& reply) {
  Reply out;
  if (!out.ParseFromString(reply.payload)) return make_error_code(errc::bad_reply);
  return out;
}

/// Calls `type` with `request` and parses the reply as Reply. A reply that does
/// not parse is errc::bad_reply (the peer broke the protocol; the caller's
/// request was fine). Other errors are blocking_connection::call's.
template <class Reply, class Request>
result<Reply> typed_call(blocking_connection& c, std::uint32_t type, const Request& request,
                         blocking_connection::clock::time_point deadline) {
  frame f;
  f.kind = frame_kind::request;
  f.type = type;
  f.payload = request.SerializeAsString();
  auto reply = c.call(std::move(f), deadline);
  if (!reply) return reply.error();
  return parse_reply<Reply>(*reply);
}

namespace detail {
template <class Reply>
struct typed_call_op {
  connection& conn;
  frame request;

  template <class Self>
  void operator()(Self& self) {
    conn.async_call(std::move(request), std::move(self));
  }
  template <class Self>
  void operator()(Self& self, error_code ec, frame reply) {
    Reply out;
    if (!ec && !out.ParseFromString(reply.payload)) ec = make_error_code(errc::bad_reply);
    self.complete(ec, std::move(out));
  }
};
}  // namespace detail

/// async_call with typed messages: completes with `void(error_code, Reply)`;
/// a reply that does not parse is errc::bad_reply. Cancellation and executors
/// are connection::async_call's. `c` must live until the completion.
template <class Reply, class Request, class Token>
auto async_typed_call(connection& c, std::uint32_t type, const Request& request, Token&& token) {
  frame f;
  f.kind = frame_kind::request;
  f.type = type;
  f.payload = request.SerializeAsString();
  return boost::asio::async_compose<Token, void(error_code, Reply)>(
      detail::typed_call_op<Reply>{c, std::move(f)}, token);
}

}  // namespace uipc
