// The host: loading shared objects (good and broken), service names and
// ownership, the list, resolved names, events, contexts.
#include <gtest/gtest.h>

#include <thread>

#include "plugin_support.hpp"

namespace uipc::plugin {
namespace {

using test::fake_plugin;
using test::logged_host;

const std::string variants = UIPC_TEST_VARIANT_DIR;
const std::string examples = UIPC_TEST_PLUGIN_DIR;

class Host : public ::testing::Test {
 protected:
  void TearDown() override { test::forget_fake_plugins(); }
};

TEST_F(Host, LoadsThePlainCExampleAndCallsItsBytesService) {
  logged_host h;
  auto name = h.h->load(examples + "/hello.so");
  ASSERT_TRUE(name) << name.error().message() << "\n" << h.log();
  EXPECT_EQ(*name, "hello");
  auto ctx = h.h->new_context().value();
  auto reply = ctx.call_bytes("hello", test::bytes("world"));
  ASSERT_TRUE(reply) << reply.error().message();
  EXPECT_EQ(test::text(*reply), "hello, world");
  auto count = ctx.call_bytes("hello count", {});
  ASSERT_TRUE(count);
  EXPECT_EQ(test::text(*count), "1");
  auto list = h.h->plugins();
  ASSERT_EQ(list.size(), 1u);
  EXPECT_FALSE(list[0].preemptive);  // hello.c declares itself cooperative
  EXPECT_EQ(list[0].services, (std::vector<std::string>{"hello", "hello count"}));
}

TEST_F(Host, BrokenSharedObjectsAreRefusedWithClearErrorsAndTheHostServesOn) {
  logged_host h;
  ASSERT_TRUE(h.h->load(
      examples + "/hello.so"));  // the variants call themselves "variant": that name stays free
  struct case_ {
    const char* file;
    errc expected;
    const char* logged;
  } cases[] = {
      {"variant_newer_major.so", errc::abi_mismatch, "built for ABI 2.0"},
      {"variant_truncated.so", errc::abi_mismatch, "truncated"},
      {"variant_no_entry.so", errc::no_entry_point, "uipc_plugin_entry"},
      {"variant_refuses.so", errc::init_failed, "refused"},
      {"variant_init_fails.so", errc::init_failed, "init returned 7"},
      {"variant_bad_name.so", errc::invalid_name, "name"},
      {"does_not_exist.so", errc::load_failed, "No such file"},
  };
  for (const auto& c : cases) {
    auto loaded = h.h->load(variants + "/" + c.file);
    ASSERT_FALSE(loaded) << c.file;
    EXPECT_EQ(loaded.error(), c.expected) << c.file << ": " << loaded.error().message();
    EXPECT_NE(h.log().find(c.logged), std::string::npos) << c.file << " logged:\n" << h.log();
  }
  // A text file is not a shared object.
  EXPECT_EQ(h.h->load("/proc/self/status").error(), errc::load_failed);
  // The good one serves on, and is the only one listed.
  auto ctx = h.h->new_context().value();
  EXPECT_EQ(test::text(ctx.call_bytes("hello", test::bytes("again")).value()), "hello, again");
  EXPECT_EQ(h.h->plugins().size(), 1u);
  EXPECT_EQ(h.h->list_services(), "hello\thello count");
  ASSERT_FALSE(h.h->quiesce(std::chrono::seconds(5)));
}

TEST_F(Host, OlderMinorDescriptionLoadsWithTheMissingFieldsZero) {
  logged_host h;
  auto loaded = h.h->load(variants + "/variant_older_minor.so");
  ASSERT_TRUE(loaded) << h.log();
  auto ctx = h.h->new_context().value();
  EXPECT_EQ(ctx.call("version", nullptr).value(), 1u);
}

TEST_F(Host, ASecondPluginOfTheSameNameIsRefused) {
  logged_host h;
  ASSERT_TRUE(h.h->load(variants + "/variant_v1.so"));
  EXPECT_EQ(h.h->load(variants + "/variant_v2.so").error(), errc::duplicate_plugin);
}

TEST_F(Host, ServiceNamesFollowTheRules) {
  fake_plugin p;
  p.name = "names";
  std::vector<int> results;
  p.init = [&](uipc_plugin_context* ctx) {
    for (const char* name : {"ok name_1", "", "has-dash", "tab\there", "dot.ted",
                             "x123456789012345678901234567890123456789012345678901234567890123"})
      results.push_back(p.serve(ctx, name, [](auto*, void*) { return 0u; }));
    return 0;
  };
  logged_host h;
  ASSERT_TRUE(h.h->load(p.entry()));
  EXPECT_EQ(results, (std::vector<int>{UIPC_PLUGIN_OK, UIPC_PLUGIN_E_INVALID_NAME,
                                       UIPC_PLUGIN_E_INVALID_NAME, UIPC_PLUGIN_E_INVALID_NAME,
                                       UIPC_PLUGIN_E_INVALID_NAME, UIPC_PLUGIN_E_INVALID_NAME}));
  EXPECT_EQ(h.h->list_services(), "ok name_1");
}

TEST_F(Host, ANameOfAnotherPluginIsNeitherTakenNorUnregistered) {
  fake_plugin a, b, thief;
  a.name = "a";
  b.name = "b";
  thief.name = "thief";
  a.init = [&](uipc_plugin_context* ctx) {
    a.serve(ctx, "shared name", [](auto*, void*) { return 1u; });
    return a.serve(ctx, "a only", [](auto*, void*) { return 2u; });
  };
  int duplicate = -1, unknown = -1, during_init = -1;
  b.init = [&](uipc_plugin_context* ctx) {
    duplicate = b.serve(ctx, "shared name", [](auto*, void*) { return 3u; });
    unknown = b.api->register_service(ctx, "never", nullptr, nullptr, 0);
    during_init = b.api->register_service(ctx, "a only", nullptr, nullptr, 0);
    return 0;
  };
  thief.init = [&](uipc_plugin_context* ctx) {
    return thief.serve(ctx, "steal", [&](uipc_plugin_context* c, void*) {
      return static_cast<std::uint64_t>(
          thief.api->register_service(c, "a only", nullptr, nullptr, 0));
    });
  };
  logged_host h;
  ASSERT_TRUE(h.h->load(a.entry()));
  ASSERT_TRUE(h.h->load(b.entry()));
  ASSERT_TRUE(h.h->load(thief.entry()));
  EXPECT_EQ(duplicate, UIPC_PLUGIN_E_DUPLICATE_SERVICE);
  EXPECT_EQ(unknown, UIPC_PLUGIN_E_SERVICE_NOT_FOUND);
  EXPECT_EQ(during_init, UIPC_PLUGIN_E_SERVICE_NOT_FOUND);  // not among what b staged
  auto ctx = h.h->new_context().value();
  EXPECT_EQ(ctx.call("steal", nullptr).value(),
            static_cast<std::uint64_t>(UIPC_PLUGIN_E_NOT_OWNER));
  // Nothing changed: a still serves both names.
  EXPECT_EQ(ctx.call("shared name", nullptr).value(), 1u);
  EXPECT_EQ(ctx.call("a only", nullptr).value(), 2u);
  EXPECT_EQ(h.h->list_services(), "a only\tshared name\tsteal");
}

TEST_F(Host, UnregisteringOwnServiceMakesCallsFailWithServiceNotFound) {
  fake_plugin a;
  a.name = "a";
  a.flags = UIPC_PLUGIN_PREEMPTIVE;
  int first = -1, second = -1;
  a.init = [&](uipc_plugin_context* ctx) {
    a.serve(ctx, "target", [](auto*, void*) { return 5u; });
    return a.serve(ctx, "drop target", [&](uipc_plugin_context* cctx, void*) {
      first = a.api->register_service(cctx, "target", nullptr, nullptr, 0);
      second = a.api->register_service(cctx, "target", nullptr, nullptr, 0);
      return 0u;
    });
  };
  logged_host h;
  ASSERT_TRUE(h.h->load(a.entry()));
  auto ctx = h.h->new_context().value();
  auto ref = h.h->resolve("target").value();
  EXPECT_EQ(ctx.call(ref, nullptr).value(), 5u);
  ASSERT_TRUE(ctx.call("drop target", nullptr));
  EXPECT_EQ(first, UIPC_PLUGIN_OK);
  EXPECT_EQ(second, UIPC_PLUGIN_E_SERVICE_NOT_FOUND);
  EXPECT_EQ(ctx.call(ref, nullptr).error(), errc::service_not_found);
  EXPECT_EQ(ctx.call("target", nullptr).error(), errc::service_not_found);
  EXPECT_EQ(h.h->list_services(), "drop target");
}

TEST_F(Host, AResolvedNameFollowsRegistrations) {
  logged_host h;
  auto ref = h.h->resolve("later").value();  // before anyone serves it
  auto ctx = h.h->new_context().value();
  EXPECT_EQ(ctx.call(ref, nullptr).error(), errc::service_not_found);
  fake_plugin p;
  p.name = "late";
  p.init = [&](uipc_plugin_context* c) {
    return p.serve(c, "later", [](auto*, void*) { return 9u; });
  };
  ASSERT_TRUE(h.h->load(p.entry()));
  EXPECT_EQ(ctx.call(ref, nullptr).value(), 9u);
  ASSERT_FALSE(h.h->unload("late"));
  EXPECT_EQ(ctx.call(ref, nullptr).error(), errc::service_not_found);
  EXPECT_EQ(h.h->resolve("bad-name").error(), errc::invalid_name);
}

TEST_F(Host, ListIsTabDelimitedAndSortedAndReachesPlugins) {
  fake_plugin p;
  p.name = "lister";
  std::string seen;
  p.init = [&](uipc_plugin_context* c) {
    p.serve(c, "zeta", [](auto*, void*) { return 0u; });
    p.serve(c, "alpha", [](auto*, void*) { return 0u; });
    return p.serve(c, "list", [&](uipc_plugin_context* cc, void*) {
      char* out = nullptr;
      std::size_t n = 0;
      int s = p.api->list_services(cc, &out, &n);
      if (s == UIPC_PLUGIN_OK) seen.assign(out, n);
      return static_cast<std::uint64_t>(s);
    });
  };
  logged_host h;
  ASSERT_TRUE(h.h->load(p.entry()));
  EXPECT_EQ(h.h->list_services(), "alpha\tlist\tzeta");
  auto ctx = h.h->new_context().value();
  EXPECT_EQ(ctx.call("list", nullptr).value(), 0u);
  EXPECT_EQ(seen, "alpha\tlist\tzeta");
}

TEST_F(Host, ServicesAreVisibleOnlyAfterInitReturned) {
  logged_host h;
  fake_plugin p;
  p.name = "slow";
  std::string during;
  p.init = [&](uipc_plugin_context* c) {
    p.serve(c, "mine", [](auto*, void*) { return 1u; });
    during = h.h->list_services();
    return 0;
  };
  ASSERT_TRUE(h.h->load(p.entry()));
  EXPECT_EQ(during, "");
  EXPECT_EQ(h.h->list_services(), "mine");
  EXPECT_EQ(p.inits.load(), 1);
}

TEST_F(Host, AFailingInitPublishesNothingAndGetsNoShutdown) {
  logged_host h;
  fake_plugin p;
  p.name = "failing";
  p.init = [&](uipc_plugin_context* c) {
    p.serve(c, "half", [](auto*, void*) { return 1u; });
    return 3;
  };
  EXPECT_EQ(h.h->load(p.entry()).error(), errc::init_failed);
  EXPECT_EQ(h.h->list_services(), "");
  EXPECT_EQ(p.shutdowns.load(), 0);
  // The name is free again, and so is the service name.
  fake_plugin q;
  q.name = "failing";
  q.init = [&](uipc_plugin_context* c) {
    return q.serve(c, "half", [](auto*, void*) { return 2u; });
  };
  ASSERT_TRUE(h.h->load(q.entry()));
  EXPECT_EQ(h.h->new_context().value().call("half", nullptr).value(), 2u);
}

TEST_F(Host, AThrowingServiceFailsItsCallAndTheHostServesOn) {
  logged_host h;
  ASSERT_TRUE(h.h->load(variants + "/variant_v1.so"));
  auto ctx = h.h->new_context().value();
  EXPECT_EQ(ctx.call("throws", nullptr).error(), errc::plugin_failed);
  EXPECT_EQ(ctx.call("version", nullptr).value(), 1u);
  auto ctx2 = std::move(ctx);  // the counters reach the host when the context ends
  ctx2 = context();
  EXPECT_EQ(h.h->stats().failed_calls, 1u);
  EXPECT_EQ(h.h->stats().calls, 2u);
}

TEST_F(Host, ShutdownRunsAtUnloadAndAtTheEnd) {
  fake_plugin a, b;
  a.name = "first";
  b.name = "second";
  std::vector<std::string> order;
  a.shutdown = [&](auto*) { order.push_back("first"); };
  b.shutdown = [&](auto*) { order.push_back("second"); };
  {
    logged_host h;
    ASSERT_TRUE(h.h->load(a.entry()));
    ASSERT_TRUE(h.h->load(b.entry()));
    EXPECT_EQ(h.h->unload("nobody"), errc::plugin_not_found);
  }
  EXPECT_EQ(order, (std::vector<std::string>{"second", "first"}));  // newest first
}

TEST_F(Host, InterestedPluginsAreToldWhenServicesComeAndGo) {
  logged_host h;
  fake_plugin listener, other;
  listener.name = "listener";
  std::vector<std::string> events;
  listener.on_event = [&](const std::string& name, int what) {
    events.push_back(name + ":" + std::to_string(what));
  };
  ASSERT_TRUE(h.h->load(listener.entry()));
  other.name = "other";
  other.init = [&](uipc_plugin_context* c) {
    return other.serve(c, "svc", [](auto*, void*) { return 0u; });
  };
  ASSERT_TRUE(h.h->load(other.entry()));
  ASSERT_FALSE(h.h->unload("other"));
  EXPECT_EQ(events, (std::vector<std::string>{"svc:1", "svc:2"}));
}

TEST_F(Host, OutOfContextContextsForAPluginsOwnThread) {
  logged_host h;
  fake_plugin p;
  p.name = "threads";
  p.flags = UIPC_PLUGIN_PREEMPTIVE;
  std::atomic<int> result{-1};
  std::thread worker;
  p.init = [&](uipc_plugin_context* c) {
    p.serve(c, "double", [](auto*, void* arg) { return 2 * *static_cast<std::uint64_t*>(arg); });
    uipc_plugin_context* own = nullptr;
    if (int s = p.api->context_new(c, &own); s != UIPC_PLUGIN_OK) return s;
    worker = std::thread([&, own] {
      std::uint64_t arg = 21, out = 0;
      int s = UIPC_PLUGIN_E_SERVICE_NOT_FOUND;
      // Init has returned once the service is visible.
      for (int i = 0; i < 2000 && s == UIPC_PLUGIN_E_SERVICE_NOT_FOUND; ++i) {
        s = p.api->call_service(own, "double", &arg, &out);
        if (s == UIPC_PLUGIN_E_SERVICE_NOT_FOUND)
          std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      void* block = nullptr;
      if (s == UIPC_PLUGIN_OK) s = p.api->pool_alloc(p.api->context_pool(own), 100, &block);
      p.api->context_dispose(own);
      result = s == UIPC_PLUGIN_OK ? static_cast<int>(out) : -s;
    });
    return 0;
  };
  ASSERT_TRUE(h.h->load(p.entry()));
  worker.join();
  EXPECT_EQ(result.load(), 42);
  EXPECT_EQ(h.h->stats().contexts_alive, 0u);
}

TEST_F(Host, ContextsForgottenByAPluginAreReleasedAtItsShutdown) {
  logged_host h;
  fake_plugin p;
  p.name = "forgetful";
  p.init = [&](uipc_plugin_context* c) {
    uipc_plugin_context* own = nullptr;
    return p.api->context_new(c, &own);  // never disposed
  };
  ASSERT_TRUE(h.h->load(p.entry()));
  EXPECT_EQ(h.h->stats().contexts_alive, 1u);
  ASSERT_FALSE(h.h->unload("forgetful"));
  ASSERT_FALSE(h.h->quiesce(std::chrono::seconds(5)));
  EXPECT_EQ(h.h->stats().contexts_alive, 0u);
  EXPECT_NE(h.log().find("not disposed"), std::string::npos);
}

TEST_F(Host, AFailingInitReleasesTheContextsItMade) {
  logged_host h;
  fake_plugin p;
  p.name = "made_then_failed";
  bool cleaned = false;
  p.init = [&](uipc_plugin_context* c) {
    uipc_plugin_context* own = nullptr;
    if (p.api->context_new(c, &own) != UIPC_PLUGIN_OK) return 1;
    p.api->pool_cleanup(
        p.api->context_pool(own), [](void* flag) { *static_cast<bool*>(flag) = true; }, &cleaned);
    return 5;
  };
  EXPECT_EQ(h.h->load(p.entry()).error(), errc::init_failed);
  EXPECT_EQ(h.h->stats().contexts_alive, 0u);
  EXPECT_TRUE(cleaned) << "the context's pool was never released";
}

TEST_F(Host, AContextDisposedTwiceIsRefusedAndTheContextMadeMeanwhileLivesOn) {
  logged_host h;
  fake_plugin p;
  p.name = "twice";
  int first = -1, second = -1, used_after = -1, last = -1;
  p.init = [&](uipc_plugin_context* c) {
    uipc_plugin_context *one = nullptr, *two = nullptr;
    if (p.api->context_new(c, &one) != UIPC_PLUGIN_OK) return 1;
    first = p.api->context_dispose(one);
    if (p.api->context_new(c, &two) != UIPC_PLUGIN_OK) return 1;
    second = p.api->context_dispose(one);  // the mistake: `one` is gone
    void* block = nullptr;
    used_after = p.api->pool_alloc(p.api->context_pool(two), 16, &block);
    last = p.api->context_dispose(two);
    return 0;
  };
  ASSERT_TRUE(h.h->load(p.entry()));
  EXPECT_EQ(first, UIPC_PLUGIN_OK);
  EXPECT_EQ(second, UIPC_PLUGIN_E_INVALID_ARGUMENT);
  EXPECT_EQ(used_after, UIPC_PLUGIN_OK);
  EXPECT_EQ(last, UIPC_PLUGIN_OK) << "the second dispose ended the other context";
  EXPECT_EQ(h.h->stats().contexts_alive, 0u);
}

TEST_F(Host, AContextInUseByACallOfThisThreadCannotBeDisposed) {
  logged_host h;
  fake_plugin p;
  p.name = "disposer";
  p.flags = UIPC_PLUGIN_PREEMPTIVE;
  int in_init = -1, in_call = -1, after = -1;
  p.init = [&](uipc_plugin_context* c) {
    in_init = p.api->context_dispose(c);  // Init's own context, in use by Init
    p.serve(c, "dispose mine", [&](uipc_plugin_context* cc, void*) {
      in_call = p.api->context_dispose(cc);
      return 0u;
    });
    return p.serve(c, "try", [&](uipc_plugin_context* cc, void*) {
      uipc_plugin_context* own = nullptr;
      if (p.api->context_new(cc, &own) != UIPC_PLUGIN_OK) return 1u;
      std::uint64_t ignored = 0;
      p.api->call_service(own, "dispose mine", nullptr, &ignored);
      void* block = nullptr;
      const int alloc = p.api->pool_alloc(p.api->context_pool(own), 16, &block);
      after = p.api->context_dispose(own);
      return alloc == UIPC_PLUGIN_OK ? 0u : 2u;
    });
  };
  ASSERT_TRUE(h.h->load(p.entry()));
  EXPECT_EQ(in_init, UIPC_PLUGIN_E_CONTEXT_BUSY);
  {
    auto ctx = h.h->new_context().value();
    EXPECT_EQ(ctx.call("try", nullptr).value(), 0u);
  }
  EXPECT_EQ(in_call, UIPC_PLUGIN_E_CONTEXT_BUSY);
  EXPECT_EQ(after, UIPC_PLUGIN_OK);
  EXPECT_EQ(h.h->stats().contexts_alive, 0u);
}

TEST_F(Host, RequestContextsCannotBeDisposedByAPluginAndBadArgumentsAreRefused) {
  logged_host h;
  auto ctx = h.h->new_context().value();
  const auto& api = host::api();
  EXPECT_EQ(api.context_dispose(ctx.get()), UIPC_PLUGIN_E_INVALID_ARGUMENT);
  EXPECT_EQ(api.context_new(nullptr, nullptr), UIPC_PLUGIN_E_INVALID_ARGUMENT);
  uipc_plugin_context* out = nullptr;
  EXPECT_EQ(api.context_new(ctx.get(), &out),
            UIPC_PLUGIN_E_INVALID_ARGUMENT);  // a request is nobody's thread
  EXPECT_EQ(api.call_service(ctx.get(), "nothing", nullptr, nullptr),
            UIPC_PLUGIN_E_SERVICE_NOT_FOUND);
  EXPECT_EQ(api.register_service(ctx.get(), "x", test::run_body, nullptr, 0),
            UIPC_PLUGIN_E_INVALID_ARGUMENT);
  EXPECT_EQ(api.call_service(nullptr, "x", nullptr, nullptr), UIPC_PLUGIN_E_INVALID_ARGUMENT);
  EXPECT_EQ(api.pool_alloc(nullptr, 1, nullptr), UIPC_PLUGIN_E_INVALID_ARGUMENT);
  EXPECT_STREQ(api.status_text(UIPC_PLUGIN_E_SERVICE_NOT_FOUND), "no service of this name");
}

TEST_F(Host, BytesCallsToAPointerServiceAreNotCompatible) {
  logged_host h;
  ASSERT_TRUE(h.h->load(variants + "/variant_v1.so"));
  auto ctx = h.h->new_context().value();
  EXPECT_EQ(ctx.call_bytes("version", test::bytes("x")).error(), errc::service_not_compatible);
  EXPECT_EQ(ctx.call_bytes("missing", test::bytes("x")).error(), errc::service_not_found);
}

TEST_F(Host, TheServiceLimitIsEnforced) {
  host_options options;
  options.max_services = 2;
  logged_host h(options);
  ASSERT_TRUE(h.h->resolve("one"));
  ASSERT_TRUE(h.h->resolve("two"));
  EXPECT_EQ(h.h->resolve("three").error(), errc::too_many);
  EXPECT_TRUE(h.h->resolve("one"));  // a known name needs no new slot
}

}  // namespace
}  // namespace uipc::plugin
