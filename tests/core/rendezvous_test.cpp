// Rendezvous: name rules, derived paths, the single-instance lock, the shared
// directory and its ownership checks, and the server uid check.
#include "uipc/core/rendezvous.hpp"

#include <fcntl.h>
#include <grp.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>

#include "test_support.hpp"
#include "uipc/core/blocking_connection.hpp"
#include "uipc/core/framed.hpp"

namespace uipc {
namespace {

using namespace std::chrono_literals;
using test::temp_dir;

constexpr uid_t nobody = 65534;

// ---- names ----------------------------------------------------------------------

TEST(RendezvousTest, NameRulesBoundTheLength) {
  const name_rules rules{1, 8, "_-"};
  EXPECT_EQ(check_name("", rules), errc::invalid_name);
  EXPECT_FALSE(check_name("a", rules));
  EXPECT_FALSE(check_name("abcdefgh", rules));  // the maximum
  EXPECT_EQ(check_name("abcdefghi", rules), errc::invalid_name);
  EXPECT_EQ(check_name("ab", name_rules{3, 8, ""}), errc::invalid_name);
}

TEST(RendezvousTest, NameRulesRefuseCharactersOutsideTheSet) {
  const name_rules rules{1, 64, "_-"};
  EXPECT_FALSE(check_name("Daemon_1-x", rules));
  for (const char* bad : {"a/b", "a b", "a.b", "../x", "a\nb", "\xc3\xa9", "a:b", "a*"}) {
    EXPECT_EQ(check_name(bad, rules), errc::invalid_name) << bad;
  }
  // The set is the caller's: '.' allowed where the rules say so.
  EXPECT_FALSE(check_name("a.b", name_rules{1, 64, "."}));
}

TEST(RendezvousTest, NameRulesRefuseAnEmbeddedNul) {
  using namespace std::string_view_literals;
  EXPECT_EQ(check_name("ab\0cd"sv, name_rules{}), errc::invalid_name);
  // Even when a careless rule set lists NUL as allowed.
  EXPECT_EQ(check_name("ab\0cd"sv, name_rules{1, 64, std::string_view("\0", 1)}),
            errc::invalid_name);
}

TEST(RendezvousTest, NameRulesRefuseANameOfOnlyDots) {
  const name_rules dots{1, 64, "._-"};
  EXPECT_EQ(check_name(".", dots), errc::invalid_name);
  EXPECT_EQ(check_name("..", dots), errc::invalid_name);
  EXPECT_EQ(check_name("...", dots), errc::invalid_name);
  EXPECT_FALSE(check_name(".a", dots));
}

// ---- paths ----------------------------------------------------------------------

TEST(RendezvousTest, PathsAreDerivedFromDirectoryPrefixAndName) {
  auto p = derive_rendezvous_paths("/run/x", "uipc-", "handles");
  ASSERT_TRUE(p) << p.error().message();
  EXPECT_EQ(p->directory, "/run/x");
  EXPECT_EQ(p->socket_path, "/run/x/uipc-handles.sock");
  EXPECT_EQ(p->start_lock_path, "/run/x/uipc-handles.start");
  EXPECT_EQ(listener_lock_path(p->socket_path), "/run/x/uipc-handles.sock.lock");
  EXPECT_EQ(derive_rendezvous_paths("/run/x/", "", "h")->socket_path, "/run/x/h.sock");
}

TEST(RendezvousTest, DerivedPathsRefuseBadNamesAndOverlongSockets) {
  EXPECT_EQ(derive_rendezvous_paths("/run/x", "uipc-", "a/b").error(), errc::invalid_name);
  EXPECT_EQ(derive_rendezvous_paths("/run/x", "uipc-", "").error(), errc::invalid_name);
  const std::string deep = "/" + std::string(100, 'd');
  EXPECT_EQ(derive_rendezvous_paths(deep, "uipc-", "handles").error(),
            boost::system::errc::filename_too_long);
}

// ---- instance lock --------------------------------------------------------------

TEST(RendezvousTest, SecondLockHolderIsRefused) {
  temp_dir dir;
  const std::string path = dir.file("x.lock");
  auto first = instance_lock::try_acquire(path);
  ASSERT_TRUE(first) << first.error().message();
  EXPECT_EQ(instance_lock::try_acquire(path).error(), errc::address_in_use);
  // From another thread too: each acquisition is its own file description.
  error_code other;
  std::thread([&] { other = instance_lock::try_acquire(path).error(); }).join();
  EXPECT_EQ(other, errc::address_in_use);
  first->release();
  EXPECT_FALSE(std::filesystem::exists(path)) << "release() leaves no file behind";
  auto second = instance_lock::try_acquire(path);
  EXPECT_TRUE(second) << second.error().message();
}

TEST(RendezvousTest, LockIsReleasedWhenItsHolderIsKilled) {
  temp_dir dir;
  const std::string path = dir.file("x.lock");
  int ready[2];
  ASSERT_EQ(::pipe2(ready, O_CLOEXEC), 0);
  const pid_t child = ::fork();
  if (child == 0) {
    auto lock = instance_lock::try_acquire(path);
    const char ok = lock ? 'y' : 'n';
    (void)::write(ready[1], &ok, 1);
    for (;;) ::pause();
  }
  ::close(ready[1]);
  char ok = 0;
  ASSERT_EQ(::read(ready[0], &ok, 1), 1);
  ::close(ready[0]);
  ASSERT_EQ(ok, 'y');
  EXPECT_EQ(instance_lock::try_acquire(path).error(), errc::address_in_use);
  ASSERT_EQ(::kill(child, SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  // The killed holder left its file; the lock went with its descriptor.
  EXPECT_TRUE(std::filesystem::exists(path));
  auto taken = instance_lock::try_acquire(path);
  EXPECT_TRUE(taken) << taken.error().message();
}

TEST(RendezvousTest, AcquireWaitsForTheHolderUntilItsDeadline) {
  temp_dir dir;
  const std::string path = dir.file("x.lock");
  auto held = instance_lock::try_acquire(path);
  ASSERT_TRUE(held);
  auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(instance_lock::acquire(path, start + 100ms).error(), errc::address_in_use);
  EXPECT_GE(std::chrono::steady_clock::now() - start, 100ms);

  std::thread releaser([&] {
    std::this_thread::sleep_for(50ms);
    held->release();
  });
  start = std::chrono::steady_clock::now();
  auto waited = instance_lock::acquire(path, start + 10s);
  releaser.join();
  ASSERT_TRUE(waited) << waited.error().message();
  EXPECT_LT(std::chrono::steady_clock::now() - start, 5s);
  // It holds the file that is at the path now, not the removed one.
  EXPECT_TRUE(std::filesystem::exists(path));
  EXPECT_EQ(instance_lock::try_acquire(path).error(), errc::address_in_use);
}

TEST(RendezvousTest, AForkedCopyOfALockNeitherRemovesNorReleasesIt) {
  temp_dir dir;
  const std::string path = dir.file("x.lock");
  auto lock = instance_lock::try_acquire(path);
  ASSERT_TRUE(lock);
  const pid_t child = ::fork();
  if (child == 0) {
    lock->release();  // the child's copy: must not touch the parent's lock
    ::_exit(0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_TRUE(std::filesystem::exists(path));
  EXPECT_EQ(instance_lock::try_acquire(path).error(), errc::address_in_use);
}

TEST(RendezvousTest, ALockFileOfAnotherUserIsRefused) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to make a file of another uid";
  temp_dir dir;
  const std::string path = dir.file("x.lock");
  std::FILE* f = std::fopen(path.c_str(), "w");
  ASSERT_NE(f, nullptr);
  std::fclose(f);
  ASSERT_EQ(::chown(path.c_str(), nobody, nobody), 0);
  EXPECT_EQ(instance_lock::try_acquire(path).error(), errc::foreign_owner);
}

// ---- shared directory -----------------------------------------------------------

TEST(RendezvousTest, SharedDirectoryIsCreatedStickyAndOpenToAll) {
  temp_dir dir;
  const std::string shared = dir.file("shared");
  auto checked = checked_shared_directory(shared);
  ASSERT_TRUE(checked) << checked.error().message();
  struct stat st {};
  ASSERT_EQ(::lstat(shared.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 01777u);
  // Checked again as it is: still fine.
  EXPECT_TRUE(checked_shared_directory(shared));
}

TEST(RendezvousTest, SharedDirectoryComesFromTheEnvironmentWhenSet) {
  temp_dir dir;
  const std::string shared = dir.file("from-env");
  const char* old = std::getenv("UIPC_SHARED_DIR");
  const std::string saved = old != nullptr ? old : "";
  ::setenv("UIPC_SHARED_DIR", shared.c_str(), 1);
  auto got = shared_rendezvous_directory();
  // Set but unsafe is an error, not a fallback to the default.
  ::setenv("UIPC_SHARED_DIR", dir.file("a-file").c_str(), 1);
  std::FILE* f = std::fopen(dir.file("a-file").c_str(), "w");
  std::fclose(f);
  auto refused = shared_rendezvous_directory();
  if (old != nullptr) {
    ::setenv("UIPC_SHARED_DIR", saved.c_str(), 1);
  } else {
    ::unsetenv("UIPC_SHARED_DIR");
  }
  ASSERT_TRUE(got) << got.error().message();
  EXPECT_EQ(*got, shared);
  EXPECT_EQ(refused.error(), errc::unsafe_directory);
}

TEST(RendezvousTest, SharedDirectoryWritableByOthersWithoutStickyBitIsRefused) {
  temp_dir dir;
  const std::string shared = dir.file("open");
  ASSERT_EQ(::mkdir(shared.c_str(), 0700), 0);
  ASSERT_EQ(::chmod(shared.c_str(), 0777), 0);
  EXPECT_EQ(checked_shared_directory(shared).error(), errc::unsafe_directory);
  ASSERT_EQ(::chmod(shared.c_str(), 0775), 0);
  EXPECT_EQ(checked_shared_directory(shared).error(), errc::unsafe_directory);
  ASSERT_EQ(::chmod(shared.c_str(), 0755), 0);
  EXPECT_TRUE(checked_shared_directory(shared));
}

TEST(RendezvousTest, SharedDirectoryThatIsASymlinkIsRefused) {
  temp_dir dir;
  const std::string real = dir.file("real");
  ASSERT_TRUE(checked_shared_directory(real));
  const std::string link = dir.file("link");
  ASSERT_EQ(::symlink(real.c_str(), link.c_str()), 0);
  EXPECT_EQ(checked_shared_directory(link).error(), errc::unsafe_directory);
  EXPECT_EQ(checked_shared_directory("relative/dir").error(), errc::unsafe_directory);
}

TEST(RendezvousTest, ForeignSharedDirectoryIsRefused) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to make a directory of another uid";
  temp_dir dir;
  const std::string shared = dir.file("theirs");
  ASSERT_EQ(::mkdir(shared.c_str(), 0700), 0);
  ASSERT_EQ(::chmod(shared.c_str(), 01777), 0);
  ASSERT_EQ(::chown(shared.c_str(), nobody, nobody), 0);
  EXPECT_EQ(checked_shared_directory(shared).error(), errc::foreign_owner);
}

// A Unix socket file at `path`, as a server would leave it.
void make_socket_file(const std::string& path) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(fd, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size());
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ::close(fd);
}

TEST(RendezvousTest, ForeignSocketInASharedDirectoryIsRefused) {
  temp_dir dir;
  auto shared = checked_shared_directory(dir.file("shared"));
  ASSERT_TRUE(shared);
  const std::string socket_path = *shared + "/server.sock";
  EXPECT_FALSE(check_shared_socket(socket_path)) << "nothing there is fine";
  make_socket_file(socket_path);
  EXPECT_FALSE(check_shared_socket(socket_path)) << "our own stale socket is fine";
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to make a socket of another uid";
  ASSERT_EQ(::lchown(socket_path.c_str(), nobody, nobody), 0);
  EXPECT_EQ(check_shared_socket(socket_path), errc::foreign_owner);
  // The listener's lock file of another uid is as bad: it could hold the path.
  ASSERT_EQ(::unlink(socket_path.c_str()), 0);
  const std::string lock = listener_lock_path(socket_path);
  std::FILE* f = std::fopen(lock.c_str(), "w");
  std::fclose(f);
  ASSERT_EQ(::chown(lock.c_str(), nobody, nobody), 0);
  EXPECT_EQ(check_shared_socket(socket_path), errc::foreign_owner);
}

TEST(RendezvousTest, AServerOfAnotherUidIsTheWrongServer) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to run a server as another uid";
  temp_dir dir;
  // The child, as nobody, must reach the shared directory through ours.
  ASSERT_EQ(::chmod(dir.path().c_str(), 0755), 0);
  auto shared = checked_shared_directory(dir.file("shared"));
  ASSERT_TRUE(shared) << shared.error().message();
  const std::string socket_path = *shared + "/impostor.sock";
  int ready[2];
  ASSERT_EQ(::pipe2(ready, O_CLOEXEC), 0);
  const pid_t child = ::fork();
  if (child == 0) {
    char ok = 'n';
    if (::setgroups(0, nullptr) == 0 && ::setgid(nobody) == 0 && ::setuid(nobody) == 0) {
      const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_un addr{};
      addr.sun_family = AF_UNIX;
      std::memcpy(addr.sun_path, socket_path.c_str(), socket_path.size());
      if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 && ::listen(fd, 4) == 0)
        ok = 'y';
    }
    (void)::write(ready[1], &ok, 1);
    for (;;) ::pause();
  }
  ::close(ready[1]);
  char ok = 0;
  const bool read_ok = ::read(ready[0], &ok, 1) == 1;
  ::close(ready[0]);
  auto c = blocking_connection::connect(socket_path);
  ::kill(child, SIGKILL);
  int status = 0;
  ::waitpid(child, &status, 0);
  ASSERT_TRUE(read_ok && ok == 'y') << "the child could not serve as nobody";
  ASSERT_TRUE(c) << c.error().message();
  EXPECT_EQ(c->peer().uid, nobody);
  EXPECT_EQ(check_server_uid(c->peer(), 0), errc::wrong_server);
  EXPECT_FALSE(check_server_uid(c->peer(), nobody));
  // And a server refuses to bind over it.
  EXPECT_EQ(check_shared_socket(socket_path), errc::foreign_owner);
}

}  // namespace
}  // namespace uipc
