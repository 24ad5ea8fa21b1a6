// uipc-caps-echo: an example caps server. Registers a point and answers each
// request with its own bytes, until SIGINT or SIGTERM.
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>

#include "uipc/caps/service.hpp"
#include "uipc/core/server.hpp"

namespace {

int usage(int status) {
  std::fprintf(
      status == 0 ? stdout : stderr,
      "usage: uipc-caps-echo --name NAME [--world | --group] [--shared] [--dir DIR]\n"
      "  --name NAME  the point to register (letters, digits, '_' and '.'; 1-63 bytes)\n"
      "  --world      anyone may connect (default: this user only)\n"
      "  --group      this user's group may connect\n"
      "  --shared     not exclusive: other servers of the name share its clients\n"
      "  --dir DIR    the rendezvous directory (default: $UIPC_SHARED_DIR or /tmp/uipc-shared)\n");
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  // Every client holds descriptors here: the soft limit of 1024 is not ours to keep.
  (void)uipc::raise_descriptor_limit();
  std::string name;
  uipc::caps::service_options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--name" && i + 1 < argc) {
      name = argv[++i];
    } else if (arg == "--world") {
      options.who = uipc::caps::access::world;
    } else if (arg == "--group") {
      options.who = uipc::caps::access::group;
    } else if (arg == "--shared") {
      options.exclusive = false;
    } else if (arg == "--dir" && i + 1 < argc) {
      options.directory = argv[++i];
    } else if (arg == "--help" || arg == "-h") {
      return usage(0);
    } else {
      return usage(2);
    }
  }
  if (name.empty()) return usage(2);

  boost::asio::io_context ctx;
  auto svc = uipc::caps::service::register_point(ctx, name, options);
  if (!svc) {
    std::fprintf(stderr, "uipc-caps-echo: cannot register %s: %s\n", name.c_str(),
                 svc.error().message().c_str());
    return 1;
  }
  boost::asio::signal_set signals(ctx, SIGINT, SIGTERM);
  signals.async_wait([&](boost::system::error_code, int) { (*svc)->stop(); });
  std::thread loop([&] { ctx.run(); });
  std::printf("uipc-caps-echo: serving %s at %s (generation %llu)\n", name.c_str(),
              (*svc)->socket_path().c_str(), static_cast<unsigned long long>((*svc)->generation()));
  std::fflush(stdout);

  for (;;) {
    auto e = (*svc)->receive();
    if (!e) break;  // stopped
    if (e->kind != uipc::caps::event_kind::request) continue;
    (void)(*svc)->reply(*e, e->view());
  }
  ctx.stop();
  loop.join();
  const auto s = (*svc)->stats();
  std::printf("uipc-caps-echo: %llu requests from %llu clients\n",
              static_cast<unsigned long long>(s.requests),
              static_cast<unsigned long long>(s.clients_total));
  return 0;
}
