// The isolation tests' fixture: a host with isolated plug-ins run by the
// test build's runner, options with short back-offs, and a scratch directory.
// Shared by isolation_test.cpp (runners, crashes, restarts, reloads) and
// isolation_host_calls_test.cpp (isolated plug-ins calling the host, and who
// may reach whose point).
#pragma once

#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <algorithm>
#include <atomic>
#include <boost/asio/io_context.hpp>
#include <cctype>
#include <cstring>
#include <filesystem>
#include <functional>
#include <mutex>
#include <sstream>
#include <thread>
#include <vector>

#include "plugin_support.hpp"
#include "test_support.hpp"
#include "uipc/caps/client.hpp"
#include "uipc/caps/point.hpp"

namespace uipc::plugin::isolation_test {

using test::logged_host;
using namespace std::chrono_literals;

inline const std::string variants = UIPC_TEST_VARIANT_DIR;

class Isolation : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/uipc-plugin-iso-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    options_.runner = UIPC_TEST_RUNNER_PATH;
    options_.directory = dir_;
    options_.first_backoff = 20ms;
  }
  void TearDown() override {
    test::forget_fake_plugins();
    std::filesystem::remove_all(dir_);
  }

  plugin_status status(host& h, const std::string& name) {
    for (auto& p : h.plugins())
      if (p.name == name) return p;
    ADD_FAILURE() << name << " not listed";
    return {};
  }

  // Calls "echo" until it answers (the runner is back) or `limit` passes.
  bool echo_answers(host& h, std::chrono::milliseconds limit) {
    const auto end = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < end) {
      auto ctx = h.new_context().value();
      auto r = ctx.call_bytes("echo", test::bytes("ping"));
      if (r && test::text(*r) == "ping") return true;
      std::this_thread::sleep_for(10ms);
    }
    return false;
  }

  // The live points of the test's directory whose names begin with
  // `prefix`: "uipc.runner." a runner's, "uipc.host." the host's for one.
  std::size_t points_named(const std::string& prefix) {
    auto points = caps::list_points(dir_);
    EXPECT_TRUE(points);
    if (!points) return 0;
    return static_cast<std::size_t>(std::count_if(
        points->begin(), points->end(), [&](auto& p) { return p.name.rfind(prefix, 0) == 0; }));
  }

  // The name of a live point of the test's directory beginning with `prefix`,
  // or empty.
  std::string point_named(const std::string& prefix) {
    auto points = caps::list_points(dir_);
    EXPECT_TRUE(points);
    if (!points) return {};
    for (const auto& p : *points)
      if (p.name.rfind(prefix, 0) == 0) return p.name;
    return {};
  }

  std::string dir_;
  isolation_options options_;
};

}  // namespace uipc::plugin::isolation_test
