// Helpers of the caps tests: a shared directory of the test's own, a loop on a
// thread, and a service answering on a thread of its own.
#pragma once

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <atomic>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "test_support.hpp"
#include "uipc/caps/client.hpp"
#include "uipc/caps/service.hpp"

namespace uipc::caps::test {

using clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

inline clock::time_point in(std::chrono::milliseconds d) { return clock::now() + d; }

std::span<const std::byte> bytes(std::string_view s);

/// An io_context run by a thread of its own while the object lives.
class loop_thread {
 public:
  loop_thread();
  ~loop_thread();
  boost::asio::io_context& ctx() { return ctx_; }
  /// Stops the thread (so that none of it is inside Asio at a fork), and
  /// starts it again.
  void pause();
  void resume();

 private:
  boost::asio::io_context ctx_;
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> work_;
  std::thread thread_;
};

/// Receives on a thread and answers every request through `answer` (default:
/// echo). Stops with the object.
class responder {
 public:
  using answer_fn = std::function<void(service&, const event&)>;
  explicit responder(service& s, answer_fn answer = {});
  ~responder();
  std::uint64_t requests() const { return requests_.load(); }
  std::uint64_t disposals() const { return disposals_.load(); }

 private:
  service& service_;
  answer_fn answer_;
  std::atomic<bool> stop_{false};
  std::atomic<std::uint64_t> requests_{0}, disposals_{0};
  std::thread thread_;
};

/// A test with its own shared rendezvous directory (mode 1777, like /tmp) and loop.
class caps_test : public ::testing::Test {
 protected:
  caps_test();
  service_options options() const;
  point_address address(const std::string& name) const;
  result<std::unique_ptr<service>> serve(const std::string& name, service_options o);
  result<std::unique_ptr<service>> serve(const std::string& name) { return serve(name, options()); }
  result<std::unique_ptr<client>> connect(const std::string& name, client_options o = {});
  /// The next event of `s` that is not `skip`, waiting up to 5 s.
  event next_event(service& s, event_kind kind);

  uipc::test::temp_dir dir_;
  loop_thread loop_;
};

/// A service in a forked child process: `setup` runs first in the child (to
/// drop privileges, say), then it registers `name` (in `options.directory`),
/// calls `serve` (which may start async receives) and runs the loop on its one
/// thread for up to a minute. Without `serve` it answers nothing. The parent continues once the
/// registration is done. The destructor, or kill(), ends the child with SIGKILL.
class child_service {
 public:
  child_service(const std::string& name, service_options options,
                std::function<void(service&, const child_service&)> serve = {},
                const std::function<void()>& setup = {});
  ~child_service();
  bool registered() const { return registered_; }
  pid_t pid() const { return pid_; }
  void kill();
  /// For `serve` in the child: tells the parent something happened.
  void note() const;
  /// In the parent: waits for the child's next note(); false if it died first.
  bool wait_note() const;

 private:
  pid_t pid_ = -1;
  int pipe_[2] = {-1, -1};
  bool registered_ = false;
};

/// Runs `body` in a forked child and returns its exit status (the child exits
/// with what body returns; 99 if it threw).
int in_child(const std::function<int()>& body);

}  // namespace uipc::caps::test
