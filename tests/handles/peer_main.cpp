// A scripted client of the handle daemon, exec'd by the multi-process tests.
// usage: handles_peer DIR NAME DAEMON_PATH COMMAND [ARGS...]
// It reports on stdout, one line per fact, and holds what it has until stdin
// closes (or it is killed). Exit status of waits: 0 signalled, 1 abandoned,
// 2 timed out, 3 daemon lost, 4 other error.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <deque>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "uipc/handles/client.hpp"

using namespace uipc::handles;

namespace {

void say(const std::string& line) {
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

void hold_until_stdin_closes() {
  char c;
  while (::read(0, &c, 1) > 0) {
  }
}

int wait_status_code(const uipc::result<wait_status>& r) {
  if (!r) return r.error() == errc::daemon_lost ? 3 : 4;
  switch (*r) {
    case wait_status::signalled:
      return 0;
    case wait_status::abandoned:
      return 1;
    case wait_status::timed_out:
      return 2;
  }
  return 4;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) return 64;
  client_options options;
  options.where.directory = argv[1];
  options.where.name = argv[2];
  options.daemon_path = argv[3];
  options.daemon_linger = std::chrono::milliseconds(0);
  const std::string command = argv[4];
  std::vector<std::string> args(argv + 5, argv + argc);

  auto c = client::connect(options);
  if (!c) {
    say("error " + c.error().message());
    return 5;
  }
  say("daemon " + std::to_string(c->daemon_pid()));

  if (command == "connect") {
    hold_until_stdin_closes();
    return 0;
  }
  if (command == "hold" && args.size() == 1) {
    // N events (one named, so a second peer can open it) and a scratch block.
    std::vector<event> held;
    for (int i = 0; i < std::atoi(args[0].c_str()); ++i) {
      auto e = c->create_event(event_reset::manual, false, i == 0 ? "held-0" : "");
      if (!e) return 4;
      held.push_back(std::move(*e));
    }
    auto block = c->store_scratch(100);
    if (!block) return 4;
    say("ready");
    hold_until_stdin_closes();
    return 0;
  }
  if (command == "own-mutex" && args.size() == 1) {
    auto m = c->create_mutex(false, args[0]);
    if (!m) return 4;
    auto r = m->wait();
    if (!r) return 4;
    say("owned");
    hold_until_stdin_closes();
    return 0;
  }
  if (command == "thread-own-mutex" && args.size() == 1) {
    // A thread takes the mutex and exits holding it; the process lives on.
    auto m = c->create_mutex(false, args[0]);
    if (!m) return 4;
    bool taken = false;
    std::thread owner([&] {
      auto r = m->wait();
      taken = r && *r == wait_status::signalled;
    });
    owner.join();
    if (!taken) return 4;
    say("thread-exited");
    hold_until_stdin_closes();
    return 0;
  }
  if ((command == "wait-event" || command == "wait-mutex") && args.size() == 2) {
    auto o = c->open(args[0]);
    if (!o) {
      say("error " + o.error().message());
      return 4;
    }
    say("waiting");
    return wait_status_code(o->wait(std::chrono::milliseconds(std::atoi(args[1].c_str()))));
  }
  if (command == "signal-event" && args.size() == 2) {
    // Signals the named event after a pause (for waits in another process).
    auto e = c->open_event(args[0]);
    if (!e) return 4;
    std::this_thread::sleep_for(std::chrono::milliseconds(std::atoi(args[1].c_str())));
    return e->signal() ? 4 : 0;
  }
  if (command == "wait-any" && args.size() == 3) {
    // Exit 10 + the position of the object taken, 2 on timeout.
    auto a = c->open(args[0]);
    auto b = c->open(args[1]);
    if (!a || !b) return 4;
    say("waiting");
    auto r = c->wait_any({&*a, &*b}, std::chrono::milliseconds(std::atoi(args[2].c_str())));
    if (!r) return r.error() == errc::daemon_lost ? 3 : 4;
    if (r->status == wait_status::timed_out) return 2;
    return 10 + static_cast<int>(r->index);
  }
  if (command == "churn" && args.size() == 1) {
    // Works the daemon until killed, from a seeded mix of requests and
    // shared-memory operations, so that a kill lands anywhere: creating,
    // opening, closing, storing scratch, owning the mutex "m", waiting on
    // the event "ev". Says "owned" the first time it holds "m". Exit 3 once
    // the daemon is lost, 4 on any other error.
    std::mt19937 rng(static_cast<std::uint32_t>(std::strtoul(args[0].c_str(), nullptr, 10)));
    auto m = c->open_mutex("m");
    auto ev = c->open_event("ev");
    if (!m || !ev) return 4;
    std::deque<object> objects;
    std::deque<scratch_block> blocks;
    bool said_owned = false;
    say("churning");
    auto failed = [](const uipc::error_code& ec) { return ec == errc::daemon_lost ? 3 : 4; };
    for (;;) {
      uipc::error_code ec;
      switch (rng() % 7) {
        case 0: {
          auto e = c->create_event(event_reset::automatic, rng() % 2 == 0,
                                   rng() % 3 == 0 ? "churn-" + std::to_string(rng() % 8) : "");
          if (!e)
            ec = e.error();
          else
            objects.push_back(std::move(*e));
          break;
        }
        case 1: {
          auto sem = c->create_semaphore(0, 4);
          if (!sem)
            ec = sem.error();
          else
            objects.push_back(std::move(*sem));
          break;
        }
        case 2: {
          auto b = c->store_scratch(1 + rng() % 256);
          if (!b)
            ec = b.error();
          else
            blocks.push_back(std::move(*b));
          break;
        }
        case 3: {
          auto r = m->wait(std::chrono::milliseconds(5));
          if (!r) {
            ec = r.error();
          } else if (*r != wait_status::timed_out) {
            if (!said_owned) say("owned");
            said_owned = true;
            std::this_thread::sleep_for(std::chrono::microseconds(rng() % 2000));
            ec = m->release();
          }
          break;
        }
        case 4: {
          auto r = ev->wait(std::chrono::milliseconds(rng() % 3));
          if (!r) ec = r.error();
          break;
        }
        case 5:
          if (!objects.empty()) {
            ec = objects.front().close();
            objects.pop_front();
          }
          if (!blocks.empty()) {
            if (!ec) ec = blocks.front().free();
            blocks.pop_front();
          }
          break;
        default: {
          auto l = c->list();
          if (!l) ec = l.error();
          break;
        }
      }
      if (ec) return failed(ec);
      if (objects.size() > 24) objects.pop_front();  // the destructor closes with a notice
      if (blocks.size() > 8) blocks.pop_front();
    }
  }
  return 64;
}
