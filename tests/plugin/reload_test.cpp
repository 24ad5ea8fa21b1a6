// Reload in place: new calls go to the new build, calls in flight finish in
// the old one, which then gets Shutdown and is unmapped; a broken new build
// leaves the old one serving; many reloads leave memory flat and no old code
// mapped.
#include <gtest/gtest.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <fstream>
#include <future>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>

#include "plugin_support.hpp"

namespace uipc::plugin {
namespace {

using test::logged_host;
using namespace std::chrono_literals;

const std::string variants = UIPC_TEST_VARIANT_DIR;

// Lines of /proc/self/maps of plug-ins the host mapped (from their memfd copies).
int mapped_plugin_objects() {
  std::ifstream maps("/proc/self/maps");
  std::set<std::string> inodes;
  for (std::string line; std::getline(maps, line);)
    if (line.find("memfd:uipc-plugin:") != std::string::npos) {
      std::istringstream fields(line);
      std::string range, perms, offset, dev, inode;
      fields >> range >> perms >> offset >> dev >> inode;
      inodes.insert(inode);
    }
  return static_cast<int>(inodes.size());
}

long resident_kib() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);)
    if (line.rfind("VmRSS:", 0) == 0) return std::stol(line.substr(6));
  return -1;
}

TEST(Reload, NewCallsGoToTheNewBuildAndCallsInFlightFinishInTheOld) {
  logged_host h;
  ASSERT_TRUE(h.h->load(variants + "/variant_v1.so"));
  auto ref = h.h->resolve("version").value();
  auto ctx = h.h->new_context().value();
  EXPECT_EQ(ctx.call(ref, nullptr).value(), 1u);
  EXPECT_EQ(mapped_plugin_objects(), 1);

  // A call of v1 in flight: it waits on an eventfd.
  int fd = ::eventfd(0, EFD_CLOEXEC);
  auto in_flight = std::async(std::launch::async, [&] {
    auto c = h.h->new_context().value();
    return c.call("block", &fd);
  });
  std::this_thread::sleep_for(50ms);  // let it get inside

  ASSERT_FALSE(h.h->reload("variant", variants + "/variant_v2.so")) << h.log();
  EXPECT_EQ(ctx.call(ref, nullptr).value(), 2u);  // new calls: the new build
  EXPECT_EQ(ctx.call("only in one", nullptr).error(), errc::service_not_found);  // dropped by v2
  EXPECT_EQ(h.h->plugins().at(0).generation, 1u);
  // The old build stays mapped while its call runs.
  EXPECT_EQ(h.h->quiesce(100ms), errc::timed_out);
  EXPECT_EQ(mapped_plugin_objects(), 2);
  std::uint64_t one = 1;
  ASSERT_EQ(::write(fd, &one, sizeof one), 8);
  EXPECT_EQ(in_flight.get().value(), 1u);  // finished in the old build
  ASSERT_FALSE(h.h->quiesce(5s));
  EXPECT_EQ(mapped_plugin_objects(), 1);  // the old one is unmapped
  ::close(fd);
}

TEST(Reload, ABuildStaysUntilTheCleanupsItLeftInALiveContextHaveRun) {
  // A service of v1 registers a cleanup (v1's code) on the caller's pool; the
  // context outlives the call and the reload. The old build must get neither
  // Shutdown nor unmapped before that context ends and its cleanup ran.
  struct forget_fakes {
    ~forget_fakes() { test::forget_fake_plugins(); }
  } forget;
  test::fake_plugin recorder;  // serves "farewell", which the variant's Shutdown calls
  recorder.name = "recorder";
  recorder.flags = UIPC_PLUGIN_PREEMPTIVE;
  std::mutex mutex;
  std::vector<int> cleanup_seen_at_shutdown;
  int set_by_cleanup = 0;
  logged_host h;  // after what its plug-ins use: it ends first
  recorder.init = [&](uipc_plugin_context* c) {
    return recorder.serve(
        c, "farewell",
        [&](auto*, void*) {
          std::lock_guard lock(mutex);
          cleanup_seen_at_shutdown.push_back(set_by_cleanup);
          return 0u;
        },
        UIPC_PLUGIN_SERVICE_BYTES);
  };
  ASSERT_TRUE(h.h->load(recorder.entry()));
  ASSERT_TRUE(h.h->load(variants + "/variant_v1.so"));
  {
    auto ctx = h.h->new_context().value();
    ASSERT_EQ(ctx.call("defer", &set_by_cleanup).value(), 0u);
    ASSERT_FALSE(h.h->reload("variant", variants + "/variant_v2.so")) << h.log();
    EXPECT_EQ(ctx.call("version", nullptr).value(), 2u);
    EXPECT_EQ(h.h->quiesce(200ms), errc::timed_out) << "the old build went with a cleanup pending";
    EXPECT_EQ(h.h->stats().retired_pending, 1u);
    EXPECT_EQ(mapped_plugin_objects(), 2);
    {
      std::lock_guard lock(mutex);
      EXPECT_TRUE(cleanup_seen_at_shutdown.empty()) << "Shutdown ran before the cleanup";
    }
    EXPECT_EQ(set_by_cleanup, 0);
  }  // the context ends: v1's cleanup runs
  EXPECT_EQ(set_by_cleanup, 1);
  ASSERT_FALSE(h.h->quiesce(5s));
  EXPECT_EQ(mapped_plugin_objects(), 1);
  {
    std::lock_guard lock(mutex);
    EXPECT_EQ(cleanup_seen_at_shutdown, std::vector<int>{1});
  }
}

TEST(Reload, ABrokenNewBuildLeavesTheOldOneServing) {
  logged_host h;
  ASSERT_TRUE(h.h->load(variants + "/variant_v1.so"));
  auto ctx = h.h->new_context().value();
  EXPECT_EQ(h.h->reload("variant", variants + "/variant_init_fails.so"), errc::init_failed);
  EXPECT_EQ(h.h->reload("variant", variants + "/variant_newer_major.so"), errc::abi_mismatch);
  EXPECT_EQ(h.h->reload("variant", variants + "/variant_bad_name.so"), errc::invalid_name);
  EXPECT_EQ(h.h->reload("nobody"), errc::plugin_not_found);
  EXPECT_EQ(ctx.call("version", nullptr).value(), 1u);
  EXPECT_EQ(ctx.call("only in one", nullptr).value(), 1u);
  ASSERT_FALSE(h.h->quiesce(5s));
  EXPECT_EQ(mapped_plugin_objects(), 1);
}

TEST(Reload, ManyReloadsUnderLoadLeaveMemoryFlatAndNoOldCodeMapped) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  constexpr int reloads = 100;  // the sanitizers keep per-object state; fewer, slower rounds
#else
  constexpr int reloads = 1000;
#endif
  logged_host h;
  ASSERT_TRUE(h.h->load(variants + "/variant_v1.so"));
  auto ref = h.h->resolve("version").value();
  std::atomic<bool> stop{false};
  std::atomic<long> ok{0}, bad{0};
  std::thread load([&] {
    auto c = h.h->new_context().value();
    while (!stop) {
      auto r = c.call(ref, nullptr);
      if (r && (*r == 1 || *r == 2))
        ++ok;
      else
        ++bad;
    }
  });
  long rss_before = 0;
  for (int i = 0; i < reloads; ++i) {
    ASSERT_FALSE(h.h->reload("variant", variants + (i % 2 ? "/variant_v1.so" : "/variant_v2.so")))
        << h.log();
    if (i == reloads / 10) {
      ASSERT_FALSE(h.h->quiesce(5s));
      rss_before = resident_kib();  // after warm-up: allocator and loader caches filled
    }
  }
  stop = true;
  load.join();
  ASSERT_FALSE(h.h->quiesce(10s));
  long rss_after = resident_kib();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_GT(ok.load(), 0);
  EXPECT_EQ(mapped_plugin_objects(), 1);
  EXPECT_EQ(h.h->stats().reloads, static_cast<std::uint64_t>(reloads));
  // Flat: well under what leaking one object per reload would cost (each maps > 16 KiB).
  EXPECT_LT(rss_after - rss_before, 4 * 1024)
      << "RSS grew from " << rss_before << " to " << rss_after << " KiB";
}

TEST(Reload, ConcurrentReloadsEachRetireTheBuildTheyReplaced) {
  // Two reloads read the same serving build; the second used to reserve the
  // name after the first committed, retire that old build a second time and
  // drop the first's build unretired (its services published, the record
  // freed). Each reload now either replaces the build serving when it began
  // or is refused, so the generations count the reloads that succeeded.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  constexpr int rounds = 40;
#else
  constexpr int rounds = 150;
#endif
  logged_host h;
  ASSERT_TRUE(h.h->load(variants + "/variant_v1.so"));
  auto ref = h.h->resolve("version").value();
  std::atomic<int> succeeded{0}, refused{0}, other{0};
  auto reloader = [&](const char* build) {
    for (int i = 0; i < rounds; ++i) {
      const error_code e = h.h->reload("variant", variants + build);
      if (!e)
        ++succeeded;
      else if (e == errc::duplicate_plugin)
        ++refused;
      else
        ++other;
    }
  };
  std::atomic<bool> stop{false};
  std::atomic<long> bad{0};
  std::thread caller([&] {
    auto c = h.h->new_context().value();
    while (!stop) {
      auto r = c.call(ref, nullptr);
      if (!r || (*r != 1 && *r != 2)) ++bad;
    }
  });
  std::thread a(reloader, "/variant_v1.so");
  std::thread b(reloader, "/variant_v2.so");
  a.join();
  b.join();
  stop = true;
  caller.join();
  EXPECT_EQ(other.load(), 0) << h.log();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_GT(succeeded.load(), 0);
  EXPECT_EQ(succeeded + refused, 2 * rounds);
  const auto plugins = h.h->plugins();
  ASSERT_EQ(plugins.size(), 1u);
  EXPECT_EQ(plugins[0].generation, static_cast<std::uint64_t>(succeeded.load()));
  EXPECT_EQ(h.h->stats().reloads, static_cast<std::uint64_t>(succeeded.load()));
  ASSERT_FALSE(h.h->quiesce(10s));
  EXPECT_EQ(mapped_plugin_objects(), 1);  // every replaced build retired and unmapped
}

TEST(Reload, AnUnloadWhileAReloadIsUnderWayIsRefused) {
  logged_host h;
  ASSERT_TRUE(h.h->load(variants + "/variant_v1.so"));
  // A reload whose new build is slow to Init holds the name meanwhile; the
  // build says when it is inside Init.
  const std::string mark = ::testing::TempDir() + "uipc-slow-init-" + std::to_string(::getpid());
  std::remove(mark.c_str());
  ASSERT_EQ(::setenv("UIPC_TEST_SLOW_INIT_MARK", mark.c_str(), 1), 0);
  auto reload = std::async(std::launch::async, [&] {
    return h.h->reload("variant", variants + "/variant_slow_init.so");
  });
  const auto until = std::chrono::steady_clock::now() + 5s;
  while (::access(mark.c_str(), F_OK) != 0 && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(1ms);
  ASSERT_EQ(::access(mark.c_str(), F_OK), 0) << "the new build's Init never ran";
  EXPECT_EQ(h.h->unload("variant"), errc::duplicate_plugin);
  EXPECT_EQ(h.h->reload("variant"), errc::duplicate_plugin);
  EXPECT_FALSE(reload.get()) << h.log();
  auto plugins = h.h->plugins();
  ASSERT_EQ(plugins.size(), 1u);
  EXPECT_EQ(plugins[0].generation, 1u);
  EXPECT_FALSE(h.h->unload("variant"));
  EXPECT_TRUE(h.h->plugins().empty());
  ASSERT_FALSE(h.h->quiesce(5s));
  EXPECT_EQ(mapped_plugin_objects(), 0);
  ::unsetenv("UIPC_TEST_SLOW_INIT_MARK");
  std::remove(mark.c_str());
}

}  // namespace
}  // namespace uipc::plugin
