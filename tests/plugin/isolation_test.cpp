// Isolated plug-ins: a runner process per plug-in, its bytes services called
// through caps; a crash fails the calls it takes with it, the runner comes
// back with back-off, and one that keeps crashing is stopped.
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

namespace uipc::plugin {
namespace {

using test::logged_host;
using namespace std::chrono_literals;

const std::string variants = UIPC_TEST_VARIANT_DIR;

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

TEST_F(Isolation, BytesServicesAreCalledInTheRunnerAndPointerOnesAreNotCompatible) {
  logged_host h;
  auto name = h.h->load_isolated(variants + "/variant_v1.so", options_);
  ASSERT_TRUE(name) << name.error().message() << "\n" << h.log();
  EXPECT_EQ(*name, "variant");
  auto ctx = h.h->new_context().value();
  auto r = ctx.call_bytes("echo", test::bytes("across processes"));
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(test::text(*r), "across processes");
  EXPECT_EQ(ctx.call("version", nullptr).error(), errc::service_not_compatible);
  EXPECT_EQ(ctx.call_bytes("version", test::bytes("x")).error(), errc::service_not_compatible);
  auto s = status(*h.h, "variant");
  EXPECT_TRUE(s.isolated);
  EXPECT_EQ(s.state, "running");
  EXPECT_NE(h.h->list_services().find("echo"), std::string::npos);
  // A large request crosses too.
  std::string big(512 * 1024, 'x');
  auto large = ctx.call_bytes("echo", test::bytes(big));
  ASSERT_TRUE(large);
  EXPECT_EQ(large->size(), big.size());
}

TEST_F(Isolation, ACrashFailsItsCallAndTheRunnerComesBack) {
  logged_host h;
  ASSERT_TRUE(h.h->load_isolated(variants + "/variant_v1.so", options_)) << h.log();
  auto ctx = h.h->new_context().value();
  EXPECT_EQ(ctx.call_bytes("crash", test::bytes("now")).error(), errc::unavailable);
  EXPECT_TRUE(echo_answers(*h.h, 10s)) << h.log();
  auto s = status(*h.h, "variant");
  EXPECT_EQ(s.state, "running");
  EXPECT_EQ(s.crashes, 1u);
  EXPECT_NE(s.last_error.find("signal"), std::string::npos) << s.last_error;
}

bool listed(host& h, const std::string& name) {
  const std::string all = "\t" + h.list_services() + "\t";
  return all.find("\t" + name + "\t") != std::string::npos;
}

// Services an isolated plug-in registers or drops after Init are followed
// here (the runner answers the host's watch when they change); a restarted
// runner's services replace the last one's.
TEST_F(Isolation, ServicesRegisteredOrDroppedAfterInitAreFollowed) {
  logged_host h;
  ASSERT_TRUE(h.h->load_isolated(variants + "/variant_v1.so", options_)) << h.log();
  auto ctx = h.h->new_context().value();
  std::uint64_t code = 99;
  ASSERT_TRUE(ctx.call_bytes("add", test::bytes("late one"), &code));
  EXPECT_EQ(code, static_cast<std::uint64_t>(UIPC_PLUGIN_OK));
  ASSERT_TRUE(uipc::test::eventually([&] { return listed(*h.h, "late one"); }, 10s)) << h.log();
  auto r = ctx.call_bytes("late one", test::bytes("relayed"));
  ASSERT_TRUE(r) << r.error().message();
  EXPECT_EQ(test::text(*r), "relayed");
  const auto services = status(*h.h, "variant").services;
  EXPECT_NE(std::find(services.begin(), services.end(), "late one"), services.end());

  // Dropped in the runner: gone here too, and a call says so.
  ASSERT_TRUE(ctx.call_bytes("drop", test::bytes("late one"), &code));
  EXPECT_EQ(code, static_cast<std::uint64_t>(UIPC_PLUGIN_OK));
  ASSERT_TRUE(uipc::test::eventually([&] { return !listed(*h.h, "late one"); }, 10s)) << h.log();
  EXPECT_EQ(ctx.call_bytes("late one", test::bytes("x")).error(), errc::service_not_found);

  // A name that breaks the rules is refused in the runner, and nothing changes here.
  ASSERT_TRUE(ctx.call_bytes("add", test::bytes("bad-name"), &code));
  EXPECT_EQ(code, static_cast<std::uint64_t>(UIPC_PLUGIN_E_INVALID_NAME));

  // Added, then the runner crashes: the new one serves what its Init
  // registers, so the late service goes and "echo" is there.
  ASSERT_TRUE(ctx.call_bytes("add", test::bytes("late two"), &code));
  ASSERT_TRUE(uipc::test::eventually([&] { return listed(*h.h, "late two"); }, 10s)) << h.log();
  EXPECT_EQ(ctx.call_bytes("crash", test::bytes("now")).error(), errc::unavailable);
  EXPECT_TRUE(echo_answers(*h.h, 10s)) << h.log();
  ASSERT_TRUE(uipc::test::eventually([&] { return !listed(*h.h, "late two"); }, 10s)) << h.log();
  EXPECT_TRUE(listed(*h.h, "echo"));
  // And the new runner is watched as well.
  ASSERT_TRUE(ctx.call_bytes("add", test::bytes("late three"), &code));
  ASSERT_TRUE(uipc::test::eventually([&] { return listed(*h.h, "late three"); }, 10s)) << h.log();
}

TEST_F(Isolation, NamesAnIsolatedPluginAddsAndDropsDoNotUseUpTheHostsServiceSlots) {
  // The variant serves 14 names; 6 more fit. It adds and drops many more
  // than that over time: each dropped name's slot must come back.
  test::fake_plugin local;  // loaded at the end; outlives the host
  host_options host_opts;
  host_opts.max_services = 20;
  logged_host h(host_opts);
  ASSERT_TRUE(h.h->load_isolated(variants + "/variant_v1.so", options_)) << h.log();
  auto ctx = h.h->new_context().value();
  for (int i = 0; i < 30; ++i) {
    const std::string name = "late " + std::to_string(i);
    std::uint64_t code = 99;
    ASSERT_TRUE(ctx.call_bytes("add", test::bytes(name), &code));
    ASSERT_EQ(code, static_cast<std::uint64_t>(UIPC_PLUGIN_OK));
    ASSERT_TRUE(uipc::test::eventually([&] { return listed(*h.h, name); }, 10s))
        << name << " never published here\n"
        << h.log();
    ASSERT_TRUE(ctx.call_bytes("drop", test::bytes(name), &code));
    ASSERT_TRUE(uipc::test::eventually([&] { return !listed(*h.h, name); }, 10s)) << h.log();
  }
  // The host's own names, and an in-process plug-in's, still get slots.
  for (int i = 0; i < 5; ++i) EXPECT_TRUE(h.h->resolve("host name " + std::to_string(i))) << i;
  local.name = "local";
  local.init = [&](uipc_plugin_context* c) {
    return local.serve(c, "local one", [](auto*, void*) { return 1u; });
  };
  ASSERT_TRUE(h.h->load(local.entry())) << h.log();
  EXPECT_EQ(ctx.call("local one", nullptr).value(), 1u);
  EXPECT_EQ(h.h->resolve("one too many").error(), errc::too_many);
}

// on_restart: called once per restart, once the new runner serves (a call
// from inside it is answered), and never for the first start.
TEST_F(Isolation, OnRestartIsCalledOncePerRestartWhenTheNewRunnerServes) {
  std::atomic<int> restarts{0}, answered{0};
  logged_host h;
  options_.on_restart = [&] {
    auto ctx = h.h->new_context().value();
    auto r = ctx.call_bytes("echo", test::bytes("again"));
    if (r && test::text(*r) == "again") ++answered;
    ++restarts;  // last, so that a test seeing it also sees the answer
  };
  ASSERT_TRUE(h.h->load_isolated(variants + "/variant_v1.so", options_)) << h.log();
  EXPECT_EQ(restarts.load(), 0);
  for (int i = 1; i <= 2; ++i) {
    auto ctx = h.h->new_context().value();
    EXPECT_EQ(ctx.call_bytes("crash", test::bytes("now")).error(), errc::unavailable);
    EXPECT_TRUE(uipc::test::eventually([&] { return restarts.load() == i; }, 10s)) << h.log();
  }
  EXPECT_EQ(answered.load(), 2);
  EXPECT_EQ(status(*h.h, "variant").crashes, 2u);
}

// environment: asked before every start, so a restarted process starts from
// what the program holds now; "NAME" alone unsets NAME.
TEST_F(Isolation, EachStartOfTheRunnerGetsTheEnvironmentOfThatMoment) {
  ASSERT_EQ(::setenv("UIPC_TEST_INHERITED", "from the host", 1), 0);
  ASSERT_EQ(::setenv("UIPC_TEST_UNSET", "should be gone", 1), 0);
  std::mutex m;
  std::string generation = "first";
  int asked = 0;
  options_.environment = [&] {
    std::lock_guard lock(m);
    ++asked;
    return std::vector<std::string>{"UIPC_TEST_GENERATION=" + generation, "UIPC_TEST_UNSET"};
  };
  logged_host h;
  ASSERT_TRUE(h.h->load_isolated(variants + "/variant_v1.so", options_)) << h.log();
  auto env = [&](const char* name) {
    auto ctx = h.h->new_context().value();
    auto r = ctx.call_bytes("getenv", test::bytes(name));
    return r ? test::text(*r) : "error: " + r.error().message();
  };
  EXPECT_EQ(env("UIPC_TEST_GENERATION"), "first");
  EXPECT_EQ(env("UIPC_TEST_INHERITED"), "from the host");
  EXPECT_EQ(env("UIPC_TEST_UNSET"), "");

  {
    std::lock_guard lock(m);
    generation = "second";
  }
  auto ctx = h.h->new_context().value();
  EXPECT_EQ(ctx.call_bytes("crash", test::bytes("now")).error(), errc::unavailable);
  ASSERT_TRUE(echo_answers(*h.h, 10s)) << h.log();
  // The first request the new process answers already sees the new value.
  EXPECT_EQ(env("UIPC_TEST_GENERATION"), "second");
  EXPECT_EQ(env("UIPC_TEST_INHERITED"), "from the host");
  {
    std::lock_guard lock(m);
    EXPECT_EQ(asked, 2);
  }
  ::unsetenv("UIPC_TEST_INHERITED");
  ::unsetenv("UIPC_TEST_UNSET");
}

// A hook that throws is the program's bug, not a reason to end it: a throwing
// environment hook fails that start, a throwing on_restart is logged, and the
// host serves on either way.
TEST_F(Isolation, HooksThatThrowFailTheStartOrAreLoggedAndTheHostServesOn) {
  logged_host h;
  auto throwing = options_;
  throwing.environment = []() -> std::vector<std::string> {
    throw std::runtime_error("no zone yet");
  };
  EXPECT_EQ(h.h->load_isolated(variants + "/variant_v1.so", throwing).error(), errc::load_failed);
  EXPECT_NE(h.log().find("the environment hook threw: no zone yet"), std::string::npos) << h.log();

  std::atomic<int> restarts{0};
  options_.on_restart = [&] {
    ++restarts;
    throw std::logic_error("restart hook bug");
  };
  ASSERT_TRUE(h.h->load_isolated(variants + "/variant_v1.so", options_)) << h.log();
  auto ctx = h.h->new_context().value();
  EXPECT_EQ(ctx.call_bytes("crash", test::bytes("now")).error(), errc::unavailable);
  ASSERT_TRUE(echo_answers(*h.h, 10s)) << h.log();
  EXPECT_TRUE(uipc::test::eventually([&] { return restarts.load() == 1; }, 10s));
  EXPECT_TRUE(uipc::test::eventually(
      [&] {
        return h.log().find("the on_restart hook threw: restart hook bug") != std::string::npos;
      },
      10s))
      << h.log();
  EXPECT_TRUE(echo_answers(*h.h, 10s)) << h.log();
}

TEST_F(Isolation, APluginThatKeepsCrashingIsStoppedNotRestartedForever) {
  options_.max_crashes = 3;
  logged_host h;
  ASSERT_TRUE(h.h->load_isolated(variants + "/variant_v1.so", options_)) << h.log();
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(i == 0 || echo_answers(*h.h, 10s)) << "restart " << i << "\n" << h.log();
    auto ctx = h.h->new_context().value();
    EXPECT_EQ(ctx.call_bytes("crash", {}).error(), errc::unavailable);
  }
  // The third crash stops it.
  const auto end = std::chrono::steady_clock::now() + 5s;
  while (status(*h.h, "variant").state != "stopped" && std::chrono::steady_clock::now() < end)
    std::this_thread::sleep_for(10ms);
  auto s = status(*h.h, "variant");
  EXPECT_EQ(s.state, "stopped");
  EXPECT_EQ(s.crashes, 3u);
  EXPECT_NE(s.last_error.find("not restarted"), std::string::npos) << s.last_error;
  auto ctx = h.h->new_context().value();
  EXPECT_EQ(ctx.call_bytes("echo", test::bytes("x")).error(), errc::unavailable);
  EXPECT_NE(h.log().find("not restarted"), std::string::npos);
}

TEST_F(Isolation, AHangingServiceCostsTheCallerItsDeadline) {
  logged_host h;
  ASSERT_TRUE(h.h->load_isolated(variants + "/variant_v1.so", options_)) << h.log();
  auto ctx = h.h->new_context().value();
  ctx.set_deadline(std::chrono::steady_clock::now() + 200ms);
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(ctx.call_bytes("hang", {}).error(), errc::timed_out);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
}

TEST_F(Isolation, UnloadEndsTheRunner) {
  logged_host h;
  ASSERT_TRUE(h.h->load_isolated(variants + "/variant_v1.so", options_)) << h.log();
  EXPECT_EQ(points_named("uipc.runner."), 1u);
  EXPECT_EQ(points_named("uipc.host."), 1u);
  ASSERT_FALSE(h.h->unload("variant"));
  ASSERT_FALSE(h.h->quiesce(10s));
  auto points = caps::list_points(dir_);
  ASSERT_TRUE(points);
  EXPECT_EQ(points->size(), 0u) << "the runner's point and the host's for it are gone";
  EXPECT_EQ(h.h->list_services(), "");
}

// The version a build of "variant" answers "echo" with (its call's result).
std::uint64_t echo_version(host& h) {
  auto ctx = h.new_context().value();
  uipc_plugin_bytes_call call{sizeof(uipc_plugin_bytes_call), 0, "v", 1, nullptr, 0};
  auto r = ctx.call("echo", &call);
  return r ? *r : 0;
}

TEST_F(Isolation, ReloadStartsTheNewBuildInANewRunnerWithoutFailingACall) {
  logged_host h;
  ASSERT_TRUE(h.h->load_isolated(variants + "/variant_v1.so", options_)) << h.log();
  EXPECT_EQ(echo_version(*h.h), 1u);
  std::atomic<bool> stop{false};
  std::atomic<int> calls{0}, failures{0};
  std::thread caller([&] {
    while (!stop.load()) {
      auto ctx = h.h->new_context().value();
      auto r = ctx.call_bytes("echo", test::bytes("during reload"));
      ++calls;
      if (!r || test::text(*r) != "during reload") ++failures;
    }
  });
  while (calls.load() < 20) std::this_thread::sleep_for(1ms);
  EXPECT_EQ(h.h->reload("variant", variants + "/variant_v2.so"), error_code()) << h.log();
  const int at_reload = calls.load();
  while (calls.load() < at_reload + 20) std::this_thread::sleep_for(1ms);
  stop = true;
  caller.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(echo_version(*h.h), 2u);
  auto s = status(*h.h, "variant");
  EXPECT_EQ(s.generation, 1u);
  EXPECT_TRUE(s.isolated);
  EXPECT_EQ(s.path, variants + "/variant_v2.so");
  EXPECT_EQ(h.h->stats().reloads, 1u);
  // The old runner ends once its calls have: one point is left.
  ASSERT_FALSE(h.h->quiesce(10s));
  EXPECT_EQ(points_named("uipc.runner."), 1u);
  EXPECT_EQ(points_named("uipc.host."), 1u);
  // From the file it was last loaded from, by default.
  EXPECT_EQ(h.h->reload("variant"), error_code()) << h.log();
  EXPECT_EQ(echo_version(*h.h), 2u);
  EXPECT_EQ(status(*h.h, "variant").generation, 2u);
}

TEST_F(Isolation, AFailedReloadLeavesTheRunningBuildServing) {
  options_.start_timeout = 2s;
  logged_host h;
  ASSERT_TRUE(h.h->load_isolated(variants + "/variant_v1.so", options_)) << h.log();
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(h.h->reload("variant", variants + "/variant_init_fails.so"), errc::load_failed)
      << h.log();
  EXPECT_EQ(h.h->reload("variant", "/nonexistent/variant.so"), errc::load_failed) << h.log();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 1900ms)
      << "a runner that ends is noticed before the timeout";
  EXPECT_EQ(echo_version(*h.h), 1u);
  EXPECT_EQ(status(*h.h, "variant").generation, 0u);
  EXPECT_EQ(status(*h.h, "variant").state, "running");
  ASSERT_FALSE(h.h->quiesce(10s));
  EXPECT_EQ(points_named("uipc.runner."), 1u) << "no runner of a failed reload is left";
  EXPECT_EQ(points_named("uipc.host."), 1u) << "nor the host's point for one";
}

TEST_F(Isolation, ABrokenPluginOrRunnerIsReported) {
  options_.start_timeout = 1s;
  logged_host h;
  EXPECT_FALSE(h.h->load_isolated(variants + "/variant_init_fails.so", options_));
  options_.runner = "/nonexistent/uipc-plugin-runner";
  EXPECT_EQ(h.h->load_isolated(variants + "/variant_v1.so", options_).error(),
            uipc::errc::program_not_found);
  EXPECT_TRUE(h.h->plugins().empty());
}

namespace {

// A bytes call's reply as text, or "error: " and why it failed.
std::string call_text(host& h, const std::string& service, const std::string& request,
                      std::uint64_t* value = nullptr) {
  auto ctx = h.new_context().value();
  auto r = ctx.call_bytes(service, test::bytes(request), value);
  return r ? test::text(*r) : "error: " + r.error().message();
}

// "hostside", an in-process plug-in of the host serving bytes services whose
// answers are text (and, if asked, a pointer service). Declared before the
// host: it must outlive it (its Shutdown runs in the host's destructor).
struct host_side {
  using answer = std::function<std::string(host_side&, uipc_plugin_context*, std::string)>;

  explicit host_side(std::vector<std::pair<std::string, answer>> services,
                     const char* pointer_service = nullptr)
      : answers(std::move(services)) {
    p.name = "hostside";
    p.flags = UIPC_PLUGIN_PREEMPTIVE;
    p.init = [this, pointer_service](uipc_plugin_context* ctx) {
      int s = 0;
      for (auto& [name, fn] : answers) {
        if (s != 0) break;
        s = p.serve(
            ctx, name.c_str(),
            [this, &fn = fn](uipc_plugin_context* c, void* arg) {
              auto* call = static_cast<uipc_plugin_bytes_call*>(arg);
              const std::string request(static_cast<const char*>(call->in), call->in_size);
              return reply(c, call, fn(*this, c, request));
            },
            UIPC_PLUGIN_SERVICE_BYTES);
      }
      if (s == 0 && pointer_service)
        s = p.serve(ctx, pointer_service, [](uipc_plugin_context*, void*) { return 7u; });
      return s;
    };
  }

  /// Calls bytes service `name` from this plug-in: its reply, or the text of
  /// the status it failed with.
  std::string call(uipc_plugin_context* ctx, const char* name, const std::string& request) {
    uipc_plugin_bytes_call inner{
        sizeof(uipc_plugin_bytes_call), 0, request.data(), request.size(), nullptr, 0};
    std::uint64_t ignored;
    const int status = p.api->call_service(ctx, name, &inner, &ignored);
    if (status != UIPC_PLUGIN_OK) return p.api->status_text(status);
    return std::string(static_cast<const char*>(inner.out), inner.out_size);
  }

  test::fake_plugin p;
  std::vector<std::pair<std::string, answer>> answers;

 private:
  std::uint64_t reply(uipc_plugin_context* ctx, uipc_plugin_bytes_call* call,
                      const std::string& text) {
    void* out = nullptr;
    if (!text.empty() && p.api->pool_alloc(p.api->context_pool(ctx), text.size(), &out) != 0)
      return 1;
    if (!text.empty()) std::memcpy(out, text.data(), text.size());
    call->out = out;
    call->out_size = text.size();
    return 0;
  }
};

// A NAME NUL PAYLOAD request for the variant's "forward".
std::string via(const std::string& name, const std::string& payload) {
  return name + std::string(1, '\0') + payload;
}

}  // namespace

TEST_F(Isolation, AnIsolatedPluginCallsTheHostsBytesServicesAsIfInProcess) {
  host_side side({{"upper",
                   [](host_side&, uipc_plugin_context*, std::string t) {
                     for (auto& ch : t)
                       ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
                     return t;
                   }}},
                 "pointer only");
  logged_host h;
  ASSERT_TRUE(h.h->load(side.p.entry()));
  ASSERT_TRUE(h.h->load_isolated(variants + "/variant_v1.so", options_)) << h.log();

  std::uint64_t status = 99;
  EXPECT_EQ(call_text(*h.h, "forward", via("upper", "from the runner"), &status),
            "FROM THE RUNNER");
  EXPECT_EQ(status, 0u);
  // A pointer service cannot cross a process boundary; an unknown name is unknown there too.
  EXPECT_EQ(call_text(*h.h, "forward", via("pointer only", "x"), &status),
            host::api().status_text(UIPC_PLUGIN_E_SERVICE_NOT_COMPATIBLE));
  EXPECT_EQ(status, static_cast<std::uint64_t>(UIPC_PLUGIN_E_SERVICE_NOT_COMPATIBLE));
  EXPECT_EQ(call_text(*h.h, "forward", via("nosuch", "x"), &status),
            host::api().status_text(UIPC_PLUGIN_E_SERVICE_NOT_FOUND));
  // The runner lists the host's services beside its plug-in's own, once each.
  const std::string listed = call_text(*h.h, "services", "");
  EXPECT_NE(listed.find("upper"), std::string::npos) << listed;
  EXPECT_NE(listed.find("pointer only"), std::string::npos) << listed;
  EXPECT_EQ(listed.find("echo"), listed.rfind("echo")) << listed;
  EXPECT_EQ(h.log(), "");
}

TEST_F(Isolation, HostServicesThatComeAndGoAreFollowedInTheRunner) {
  host_side side({{"late", [](host_side&, uipc_plugin_context*, std::string) {
                     return std::string("late answer");
                   }}});
  logged_host h;
  ASSERT_TRUE(h.h->load_isolated(variants + "/variant_v1.so", options_)) << h.log();
  const std::string not_found = host::api().status_text(UIPC_PLUGIN_E_SERVICE_NOT_FOUND);
  constexpr auto npos = std::string::npos;
  EXPECT_EQ(call_text(*h.h, "forward", via("late", "")), not_found);

  ASSERT_TRUE(h.h->load(side.p.entry()));
  auto until = [](auto done) {
    const auto end = std::chrono::steady_clock::now() + 5s;
    while (!done() && std::chrono::steady_clock::now() < end) std::this_thread::sleep_for(2ms);
    return done();
  };
  EXPECT_TRUE(until([&] { return call_text(*h.h, "forward", via("late", "")) == "late answer"; }));
  EXPECT_TRUE(until([&] { return call_text(*h.h, "events", "").find("+late\n") != npos; }))
      << "the isolated plug-in was told";

  ASSERT_FALSE(h.h->unload("hostside"));
  EXPECT_TRUE(until([&] { return call_text(*h.h, "events", "").find("-late\n") != npos; }));
  EXPECT_EQ(call_text(*h.h, "forward", via("late", "")), not_found);
  EXPECT_EQ(call_text(*h.h, "services", "").find("late"), npos) << "gone from the runner's list";
}

TEST_F(Isolation, ACallThatComesBackIntoTheIsolatedPluginIsServed) {
  // A -> host -> A: the runner's worker waiting on the host leaves another to
  // serve the call that comes back.
  host_side side({{"bounce", [](host_side& self, uipc_plugin_context* c, std::string request) {
                     return self.call(c, "forward", request);
                   }}});
  logged_host h;
  ASSERT_TRUE(h.h->load(side.p.entry()));
  ASSERT_TRUE(h.h->load_isolated(variants + "/variant_v1.so", options_)) << h.log();
  EXPECT_EQ(call_text(*h.h, "forward", via("bounce", via("echo", "there and back"))),
            "there and back");
  EXPECT_EQ(call_text(*h.h, "forward",
                      via("bounce", via("forward", via("bounce", via("echo", "twice"))))),
            "twice");
  // Twice through the host, from several callers at once.
  std::vector<std::thread> callers;
  std::atomic<int> right{0};
  for (int t = 0; t < 4; ++t)
    callers.emplace_back([&, t] {
      const std::string word = "deep " + std::to_string(t);
      const auto request = via("bounce", via("forward", via("bounce", via("echo", word))));
      const std::string got = call_text(*h.h, "forward", request);
      if (got == word)
        ++right;
      else
        ADD_FAILURE() << got;
    });
  for (auto& c : callers) c.join();
  EXPECT_EQ(right.load(), 4);
}

TEST_F(Isolation, CallsThatNestWithoutEndAreRefusedNotLeftWaiting) {
  host_side side({{"again", [](host_side& self, uipc_plugin_context* c, std::string) {
                     return self.call(c, "forward", via("again", ""));
                   }}});
  logged_host h;
  ASSERT_TRUE(h.h->load(side.p.entry()));
  ASSERT_TRUE(h.h->load_isolated(variants + "/variant_v1.so", options_)) << h.log();
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(call_text(*h.h, "forward", via("again", "")),
            host::api().status_text(UIPC_PLUGIN_E_TOO_MANY));
  EXPECT_LT(std::chrono::steady_clock::now() - start, options_.call_timeout)
      << "refused at the bound, not timed out";
  EXPECT_EQ(call_text(*h.h, "echo", "still serving"), "still serving");
}

TEST_F(Isolation, OnlyItsRunnerMayCallThroughTheHostsPoint) {
  std::atomic<int> calls{0};
  host_side side({{"upper", [&](host_side&, uipc_plugin_context*, std::string) {
                     ++calls;
                     return std::string("X");
                   }}});
  logged_host h;
  ASSERT_TRUE(h.h->load(side.p.entry()));
  ASSERT_TRUE(h.h->load_isolated(variants + "/variant_v1.so", options_)) << h.log();
  const std::string point = point_named("uipc.host.");
  ASSERT_FALSE(point.empty());
  boost::asio::io_context io;
  auto stranger = caps::client::connect(io, {point, ::getuid(), std::nullopt, dir_});
  ASSERT_TRUE(stranger) << stranger.error().message();
  const std::string call_upper = std::string("\x02\x05upper", 7) + "x";
  auto reply = (*stranger)->call(call_upper, std::chrono::steady_clock::now() + 5s);
  EXPECT_FALSE(reply) << "another process of the user is not the runner";
  EXPECT_EQ(calls.load(), 0) << "and its call ran nothing";
  EXPECT_EQ(call_text(*h.h, "forward", via("upper", "")), "X") << "the runner still is";
  EXPECT_EQ(calls.load(), 1);
}

TEST_F(Isolation, OnlyItsHostMayCallTheRunnersPoint) {
  logged_host h;
  ASSERT_TRUE(h.h->load_isolated(variants + "/variant_v1.so", options_)) << h.log();
  const std::string point = point_named("uipc.runner.");
  ASSERT_FALSE(point.empty());
  // Another process of the user sends a well-formed call of "echo" (op 2, a
  // 4-byte name, then the payload) straight to the runner: refused, unserved.
  const std::string command = std::string(UIPC_TEST_UIPCCTL_PATH) + " caps --dir " + dir_ +
                              " call " + point +
                              " \"$(printf '\\002\\004echox')\" --timeout 2000 >/dev/null 2>&1";
  const int exit_status = std::system(command.c_str());
  ASSERT_TRUE(WIFEXITED(exit_status));
  EXPECT_NE(WEXITSTATUS(exit_status), 0) << "the runner served a process that is not its host";
  EXPECT_TRUE(echo_answers(*h.h, 5s)) << "the host still is served\n" << h.log();
  EXPECT_EQ(status(*h.h, "variant").crashes, 0u);
}

TEST_F(Isolation, TheBackoffStartsOverAfterAWindowWithoutACrash) {
  options_.first_backoff = 50ms;
  options_.crash_window = 3s;  // the first two crashes fit in it on a loaded machine
  options_.max_crashes = 10;
  logged_host h;
  ASSERT_TRUE(h.h->load_isolated(variants + "/variant_v1.so", options_)) << h.log();
  auto crash_and_return = [&] {
    auto ctx = h.h->new_context().value();
    EXPECT_EQ(ctx.call_bytes("crash", test::bytes("now")).error(), errc::unavailable);
    EXPECT_TRUE(echo_answers(*h.h, 10s)) << h.log();
  };
  crash_and_return();
  crash_and_return();                   // within the window: doubled
  std::this_thread::sleep_for(3500ms);  // a whole window served without a crash
  crash_and_return();                   // from the start again
  std::vector<std::string> waits;
  std::istringstream lines(h.log());
  for (std::string line; std::getline(lines, line);) {
    const auto at = line.find("restarting in ");
    if (at != std::string::npos) waits.push_back(line.substr(at + 14));
  }
  ASSERT_EQ(waits.size(), 3u) << h.log();
  EXPECT_EQ(waits[0], "50 ms");
  EXPECT_EQ(waits[1], "100 ms");
  EXPECT_EQ(waits[2], "50 ms");
}

TEST_F(Isolation, TheIsolatedPluginsShutdownMayStillCallTheHost) {
  std::atomic<int> farewells{0};
  host_side side({{"farewell", [&](host_side&, uipc_plugin_context*, std::string request) {
                     if (request == "bye") ++farewells;
                     return std::string();
                   }}});
  logged_host h;
  ASSERT_TRUE(h.h->load(side.p.entry()));
  ASSERT_TRUE(h.h->load_isolated(variants + "/variant_v1.so", options_)) << h.log();
  ASSERT_FALSE(h.h->unload("variant"));
  ASSERT_FALSE(h.h->quiesce(10s));
  EXPECT_EQ(farewells.load(), 1) << "its Shutdown reached the host before the host's point went";
}

TEST_F(Isolation, ARunnerThatCannotReachItsHostsPointSaysSoInItsExitStatus) {
  const std::string command = std::string(UIPC_TEST_RUNNER_PATH) + " --point uipc.runner.alone" +
                              " --dir " + dir_ + " --host-point uipc.host.nobody " + variants +
                              "/variant_v1.so 2>/dev/null";
  const int status = std::system(command.c_str());
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 3);
  auto points = caps::list_points(dir_);
  ASSERT_TRUE(points);
  EXPECT_TRUE(points->empty()) << "it never served";
}

}  // namespace
}  // namespace uipc::plugin
