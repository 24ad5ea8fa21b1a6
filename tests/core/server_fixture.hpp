// The server tests' fixture: a server on its own loop thread, a router with
// an echo, a counting notice and a slow request, and hooks that record how
// each session ended. Shared by server_test.cpp (serving and admission) and
// server_lifecycle_test.cpp (deadlines, idle exit, stop, fork, accept).
#pragma once

#include <fcntl.h>
#include <google/protobuf/wrappers.pb.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/use_future.hpp>
#include <cstring>
#include <future>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "raw_peer.hpp"
#include "test_support.hpp"
#include "uipc/core/server.hpp"
#include "uipc/core/typed.hpp"

namespace uipc::server_test {

using google::protobuf::StringValue;
using google::protobuf::UInt32Value;
using test::raw_connect;
using clock_type = std::chrono::steady_clock;

inline constexpr std::uint32_t echo_type = 1;
inline constexpr std::uint32_t count_type = 2;
inline constexpr std::uint32_t slow_type = 3;

inline clock_type::time_point soon() { return clock_type::now() + std::chrono::seconds(5); }

// The bytes of a whole frame: a count notice adding 1.
inline std::string count_notice() {
  proto::Envelope env;
  env.set_kind(proto::Envelope::NOTICE);
  env.set_type(count_type);
  UInt32Value one;
  one.set_value(1);
  env.set_payload(one.SerializeAsString());
  return test::envelope_bytes(env);
}

// Whether the peer closed `fd` within a few seconds (EOF or reset; an error
// notice may come first).
inline bool closed_by_peer(int fd) {
  timeval tv{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  char buf[512];
  for (;;) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n == 0) return true;
    if (n < 0) return errno == ECONNRESET;
  }
}

// A server on its own loop thread, with hooks that record what happened.
class ServerTest : public ::testing::Test {
 protected:
  ServerTest() {
    router_.on<StringValue, StringValue>(
        echo_type, [this](request_context& ctx, const StringValue& in) {
          handled_at_echo_ = handled_.load();
          ++handled_;
          last_peer_pid_ = ctx.session.peer().pid;
          StringValue out;
          out.set_value(std::string(in.value().rbegin(), in.value().rend()));
          return result<StringValue>(out);
        });
    router_.on<UInt32Value, UInt32Value>(
        count_type,
        [this](request_context& ctx, const UInt32Value& in) -> result<UInt32Value> {
          ++handled_;
          if (in.value() == 0) return make_error_code(errc::not_held);
          std::lock_guard lock(mutex_);
          held_[ctx.session.id()] += in.value();
          UInt32Value out;
          out.set_value(held_[ctx.session.id()]);
          return out;
        },
        request_router::notices::served);
    router_.on<UInt32Value, UInt32Value>(
        slow_type, [this](request_context&, const UInt32Value& in) {
          ++handled_;
          slow_started_ = true;
          std::this_thread::sleep_for(std::chrono::milliseconds(in.value()));
          slow_finished_ = true;
          return result<UInt32Value>(in);
        });
  }

  ~ServerTest() override {
    if (server_) server_->stop();
    server_.reset();
    guard_.reset();
    if (thread_.joinable()) thread_.join();
  }

  void start(server_options o = {}) {
    o.on_session_end = [this, user = std::move(o.on_session_end)](server_session& s,
                                                                  error_code reason) {
      {
        std::lock_guard lock(mutex_);
        ++ended_[s.id()];
        reasons_[s.id()] = reason;
        released_ += held_[s.id()];
        held_.erase(s.id());
      }
      if (user) user(s, reason);
    };
    auto s = server::start(ctx_, path_, router_, std::move(o));
    ASSERT_TRUE(s) << s.error().message();
    server_ = std::move(*s);
    thread_ = std::thread([this] { ctx_.run(); });
  }

  blocking_connection client() {
    auto c = blocking_connection::connect(path_);
    EXPECT_TRUE(c) << c.error().message();
    return std::move(*c);
  }

  bool wait_for(const std::function<bool()>& done,
                std::chrono::seconds patience = std::chrono::seconds(10)) {
    const auto until = clock_type::now() + patience;
    while (!done()) {
      if (clock_type::now() > until) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return true;
  }

  std::size_t sessions_ended() {
    std::lock_guard lock(mutex_);
    return ended_.size();
  }

  test::temp_dir dir_;
  std::string path_ = dir_.file("server.sock");
  boost::asio::io_context ctx_;
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> guard_{
      ctx_.get_executor()};
  request_router router_;
  std::unique_ptr<server> server_;
  std::thread thread_;

  std::atomic<int> handled_{0};
  std::atomic<int> handled_at_echo_{0};
  std::atomic<pid_t> last_peer_pid_{0};
  std::atomic<bool> slow_started_{false};
  std::atomic<bool> slow_finished_{false};
  std::mutex mutex_;
  std::map<std::uint64_t, std::uint32_t> held_;
  std::map<std::uint64_t, int> ended_;
  std::map<std::uint64_t, error_code> reasons_;
  std::uint64_t released_ = 0;
};

}  // namespace uipc::server_test
