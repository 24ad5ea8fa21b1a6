// Deaths in the middle of a mutex operation, driven directly (src/segment.hpp):
// a forked process ends itself at a step of a release or a take (a test hook
// _exits there), the daemon's repair runs, and the mutex is left usable, and
// abandoned wherever the data it guards may be inconsistent.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <span>

#include "segment.hpp"
#include "slot_state.hpp"

namespace uipc::handles::detail {
namespace {

using namespace std::chrono_literals;

// A segment shared with forked children, slot 1 a mutex, and the daemon's
// record of the slots' types.
struct one_mutex_segment {
  static constexpr std::uint32_t slots = 2;
  const std::size_t bytes = segment_bytes(slots, 64);
  void* memory = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  segment_view v{};
  std::array<object_type, slots> types{object_type::none, object_type::mutex};

  one_mutex_segment() {
    if (!mapped()) return;
    v = format_segment(memory, bytes, slots, 64, 1);
    publish_state(v, daemon_state::running);
  }
  ~one_mutex_segment() {
    if (mapped()) ::munmap(memory, bytes);
  }
  one_mutex_segment(const one_mutex_segment&) = delete;
  one_mutex_segment& operator=(const one_mutex_segment&) = delete;

  bool mapped() const { return memory != MAP_FAILED; }
  /// Slot 1 published afresh as a free mutex.
  slot& fresh_mutex() {
    object_init init;
    init.type = object_type::mutex;
    publish_slot(v, 1, 1, init);
    return v.at(1);
  }
};

// The test hooks' target: the process ends at this step.
int death_step = 0;
void die_at_step(int step) {
  if (step == death_step) ::_exit(0);
}

// The process dies at each step of a mutex release (the test hook _exits there):
// whichever step, the daemon's repair leaves the mutex free or abandoned, never
// owned by a tid nobody will release.
TEST(SegmentDeathTest, DeathAtAnyStepOfAReleaseLeavesTheMutexUsable) {
  one_mutex_segment seg;
  ASSERT_TRUE(seg.mapped());
  segment_view& v = seg.v;
  const auto& types = seg.types;
  for (int step = 1; step <= 2; ++step) {
    slot& m = seg.fresh_mutex();
    death_step = step;
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      const wait_target t{&m, object_type::mutex, 1};
      auto taken = wait(v, std::span(&t, 1), false, 0ns, 0ns);
      if (!taken || taken->status != wait_status::signalled) ::_exit(2);
      release_step_hook = &die_at_step;
      (void)release_mutex(m);
      ::_exit(3);  // the hook did not fire
    }
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    ASSERT_TRUE(WIFEXITED(status));
    ASSERT_EQ(WEXITSTATUS(status), 0) << "step " << step;
    const auto repaired = repair_dead_process(v, child, types, /*exited=*/true);
    EXPECT_FALSE(repaired.incomplete);
    const wait_target t{&m, object_type::mutex, 1};
    auto r = wait(v, std::span(&t, 1), false, 0ns, 0ns);
    ASSERT_TRUE(r);
    EXPECT_NE(r->status, wait_status::timed_out) << "died at step " << step << ": mutex stuck";
    if (r->status != wait_status::timed_out) {
      EXPECT_FALSE(release_mutex(m));
    }
  }
}

TEST(SegmentDeathTest, ATakerOfAnAbandonedMutexThatDiesBeforeItsCommitLeavesItAbandoned) {
  // The last owner died holding the mutex (abandoned). The next taker locks
  // it, reads the flag, and dies before its commit: the repair gives the mutex
  // back free, and its next owner must still learn that the data it guards
  // may be inconsistent.
  one_mutex_segment seg;
  ASSERT_TRUE(seg.mapped());
  segment_view& v = seg.v;
  const auto& types = seg.types;
  slot& m = seg.fresh_mutex();
  death_step = 1;
  for (const bool all : {false, true}) {
    m.abandoned.store(1);
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      take_step_hook = &die_at_step;
      const wait_target t{&m, object_type::mutex, 1};
      (void)wait(v, std::span(&t, 1), all, 0ns, 0ns);
      ::_exit(3);  // the hook did not fire
    }
    const char* how = all ? "wait-all" : "wait-any";
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    ASSERT_TRUE(WIFEXITED(status));
    ASSERT_EQ(WEXITSTATUS(status), 0) << how;
    EXPECT_FALSE(repair_dead_process(v, child, types, /*exited=*/true).incomplete);
    EXPECT_EQ(m.state.load(), 0u) << how;  // unlocked and free
    const wait_target t{&m, object_type::mutex, 1};
    auto r = wait(v, std::span(&t, 1), all, 0ns, 0ns);
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, wait_status::abandoned) << how;
    EXPECT_EQ(m.abandoned.load(), 0u);  // told once
    EXPECT_FALSE(release_mutex(m));
  }
}

}  // namespace
}  // namespace uipc::handles::detail
