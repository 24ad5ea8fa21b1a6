// Built from outside the tree with only `pkg-config --cflags --libs uipc-caps`:
// a caps point and a client of it in one process, one call and its reply.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <uipc/caps/client.hpp>
#include <uipc/caps/service.hpp>
#include <uipc/core/event_loop.hpp>

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const std::string directory = argv[1];  // a private rendezvous directory
  using namespace uipc::caps;
  uipc::event_loop loop;
  service_options o;
  o.directory = directory;
  auto svc = service::register_point(loop.context(), "pkgconfig.echo", o);
  if (!svc) return std::fprintf(stderr, "register: %s\n", svc.error().message().c_str()), 1;
  std::thread server([&] {
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    for (;;) {
      auto e = (*svc)->receive(until);
      if (!e) return;
      if (e->kind == event_kind::request) (*svc)->reply(e->client, e->id, e->copy() + " back");
    }
  });
  std::thread loop_thread([&] { loop.run(); });
  bool ok = false;
  {
    auto c = client::connect(loop.context(),
                             point_address{"pkgconfig.echo", ::geteuid(), {}, directory});
    if (c) {
      auto r = (*c)->call("hello", std::chrono::steady_clock::now() + std::chrono::seconds(5));
      ok = r && std::string(reinterpret_cast<const char*>(r->view().data()), r->view().size()) ==
                    "hello back";
    } else {
      std::fprintf(stderr, "connect: %s\n", c.error().message().c_str());
    }
  }
  (*svc)->stop();
  server.join();
  loop.stop();
  loop_thread.join();
  std::printf("pkg-config consumer: %s\n", ok ? "ok" : "failed");
  return ok ? 0 : 1;
}
