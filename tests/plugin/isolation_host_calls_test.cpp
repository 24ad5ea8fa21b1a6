// Isolated plug-ins calling back into their host: the host's bytes services
// called from the runner as if in process, services that come and go, calls
// that come back or nest without end, who may call through whose point, the
// back-off starting over, and the runner's exit status when it cannot reach
// its host.
#include "isolation_fixture.hpp"

namespace uipc::plugin::isolation_test {
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
}  // namespace uipc::plugin::isolation_test
