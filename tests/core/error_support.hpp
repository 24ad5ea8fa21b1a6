// Shared by the error tests of every module: an error sent as a reply's error
// over a real connection, as the calling side decodes it.
#pragma once

#include <boost/asio/io_context.hpp>
#include <optional>
#include <vector>

#include "test_support.hpp"
#include "uipc/core/error.hpp"
#include "uipc/core/framed.hpp"

namespace uipc::test {

/// Every portable condition.
inline constexpr condition all_conditions[] = {
    condition::disconnected,      condition::timed_out,     condition::shutting_down,
    condition::no_buffers,        condition::unimplemented, condition::protocol_violation,
    condition::permission_denied, condition::not_found,
};

/// `code` compares equal to `expected` and to no other condition (none at all
/// when nullopt), both ways round.
inline void expect_only(const error_code& code, std::optional<condition> expected) {
  for (const condition c : all_conditions) {
    EXPECT_EQ(code == c, expected == c) << code.to_string() << " (" << code.message()
                                        << ") against " << make_error_condition(c).message();
    EXPECT_EQ(c == code, expected == c) << "reversed: " << code.to_string();
  }
}

/// `code` put on the wire by make_error_reply (to_wire_error) on one end of a
/// socketpair, and the error the other end's async_call completes with, when
/// that end knows the categories `known` (connection_options::error_categories).
inline error_code through_the_wire(error_code code,
                                   std::vector<const boost::system::error_category*> known = {}) {
  boost::asio::io_context ctx;
  connection_options options;
  options.error_categories = std::move(known);
  auto ends = connection::pair(ctx, options);
  if (!ends) {
    ADD_FAILURE() << "socketpair: " << ends.error().message();
    return {};
  }
  auto [client, server] = *ends;
  server->async_receive([server, code](error_code ec, frame f) {
    if (!ec) {
      EXPECT_FALSE(server->send(make_error_reply(f, code)));
    }
  });
  frame request;
  request.type = 1;
  error_code got;
  bool done = false;
  client->async_call(std::move(request), [&](error_code ec, frame) {
    got = ec;
    done = true;
  });
  EXPECT_TRUE(run_until(ctx, [&] { return done; }));
  client->close();
  server->close();
  return got;
}

}  // namespace uipc::test
