// Uses the installed uipc::core: one framed call over a socket pair.
#include <boost/asio/io_context.hpp>
#include <cstdio>
#include <uipc/core/event_loop.hpp>
#include <uipc/core/framed.hpp>

int main() {
  uipc::event_loop loop;
  auto pair = uipc::connection::pair(loop.context());
  if (!pair) return 1;
  auto [client, server] = *pair;
  server->async_receive([server](uipc::error_code ec, uipc::frame f) {
    if (!ec) server->async_send(uipc::make_reply(f, 0, "pong"), [](uipc::error_code) {});
  });
  bool ok = false;
  uipc::frame ping;
  ping.payload = "ping";
  client->async_call(std::move(ping), [&](uipc::error_code ec, uipc::frame reply) {
    ok = !ec && reply.payload == "pong";
    client->close();
    server->close();
    loop.stop();
  });
  loop.run();
  std::printf("consumer: %s\n", ok ? "ok" : "failed");
  return ok ? 0 : 1;
}
