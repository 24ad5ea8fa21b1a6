// Reload in place: new calls go to the new build, calls in flight finish in
// the old one, which then gets Shutdown and is unmapped; a broken new build
// leaves the old one serving; many reloads leave memory flat and no old code
// mapped.
#include <gtest/gtest.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <fstream>
#include <future>
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

}  // namespace
}  // namespace uipc::plugin
