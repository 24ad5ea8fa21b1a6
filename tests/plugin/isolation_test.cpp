// Isolated plug-ins: a runner process per plug-in, its bytes services called
// through caps; a crash fails the calls it takes with it, the runner comes
// back with back-off, and one that keeps crashing is stopped.
#include "isolation_fixture.hpp"

namespace uipc::plugin::isolation_test {
namespace {

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

}  // namespace
}  // namespace uipc::plugin::isolation_test
