// Shared by the error tests of every module: an error sent as a reply's error
// over a real connection, as the calling side decodes it.
#pragma once

#include <boost/asio/io_context.hpp>
#include <vector>

#include "test_support.hpp"
#include "uipc/core/error.hpp"
#include "uipc/core/framed.hpp"

namespace uipc::test {

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
