// The death flag: the kernel marks the word when the process that armed it
// dies, by a signal or an exit, and leaves it unmarked once the flag let go.
#include "uipc/core/death_flag.hpp"

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <new>
#include <thread>

namespace uipc {
namespace {

// A word in a shared anonymous mapping, seen by this process and its children.
class DeathFlagTest : public ::testing::Test {
 protected:
  void SetUp() override {
    page_ = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    ASSERT_NE(page_, MAP_FAILED);
    word_ = new (page_) std::atomic<std::uint32_t>(0);
  }
  void TearDown() override { ::munmap(page_, 4096); }

  enum class ending { killed, exits, lets_go_then_killed };

  // A child that arms the word, says so on a pipe, then ends as told.
  void child_that(ending how) {
    int ready[2];
    ASSERT_EQ(::pipe(ready), 0);
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      ::close(ready[0]);
      auto flag = death_flag::arm(*word_);
      if (!flag) ::_exit(10);
      if (how == ending::lets_go_then_killed) flag->reset();
      const char c = 'a';
      if (::write(ready[1], &c, 1) != 1) ::_exit(11);
      if (how == ending::exits) ::_exit(0);  // no destructor runs: the flag is still held
      ::pause();
      ::_exit(12);
    }
    ::close(ready[1]);
    char c = 0;
    ASSERT_EQ(::read(ready[0], &c, 1), 1) << "the child could not arm the flag";
    ::close(ready[0]);
    if (how != ending::exits) {
      EXPECT_FALSE(death_marked(*word_)) << "marked while the child lives";
      ASSERT_EQ(::kill(pid, SIGKILL), 0);
    }
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  }

  void* page_ = nullptr;
  std::atomic<std::uint32_t>* word_ = nullptr;
};

TEST_F(DeathFlagTest, AProcessKilledWhileHoldingItIsMarked) {
  child_that(ending::killed);
  EXPECT_TRUE(death_marked(*word_));
}

TEST_F(DeathFlagTest, AProcessThatExitsWhileHoldingItIsMarked) {
  child_that(ending::exits);
  EXPECT_TRUE(death_marked(*word_));
}

TEST_F(DeathFlagTest, AFlagLetGoIsNotMarkedWhateverBecomesOfItsProcess) {
  child_that(ending::lets_go_then_killed);
  EXPECT_NE(word_->load(), 0u) << "the holder's id stays in the word";
  EXPECT_FALSE(death_marked(*word_));
}

TEST_F(DeathFlagTest, ArmedAndLetGoHereLeavesTheWordUnmarked) {
  {
    auto flag = death_flag::arm(*word_);
    ASSERT_TRUE(flag) << flag.error().message();
    EXPECT_NE(word_->load(), 0u);
    EXPECT_FALSE(death_marked(*word_));
  }
  EXPECT_FALSE(death_marked(*word_));
  // Armed again (a daemon restarted on the same memory): held by a new thread.
  auto again = death_flag::arm(*word_);
  ASSERT_TRUE(again);
  EXPECT_FALSE(death_marked(*word_));
}

// A program that arms a flag and forks a child that ends by returning from
// main: the child's copy goes with its destructors, at once, and leaves the
// parent's flag held.
TEST_F(DeathFlagTest, AForkedChildDestroysItsCopyAtOnceAndLeavesTheFlagHeld) {
  auto flag = death_flag::arm(*word_);
  ASSERT_TRUE(flag) << flag.error().message();
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    flag->reset();
    ::_exit(0);
  }
  int status = 0;
  bool exited = false;
  for (int i = 0; i < 1000 && !exited; ++i) {
    exited = ::waitpid(pid, &status, WNOHANG) == pid;
    if (!exited) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  if (!exited) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, &status, 0);
  }
  ASSERT_TRUE(exited) << "destroying the copy hung in the child";
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  EXPECT_FALSE(death_marked(*word_)) << "the child's exit marked the parent's flag";
  flag->reset();
  EXPECT_FALSE(death_marked(*word_));
}

TEST(DeathFlag, AWordNeverArmedIsNotMarked) {
  std::atomic<std::uint32_t> word{0};
  EXPECT_FALSE(death_marked(word));
  word.store(death_mark | 1234);
  EXPECT_TRUE(death_marked(word));
}

}  // namespace
}  // namespace uipc
