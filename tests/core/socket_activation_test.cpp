// Socket activation: a listener takes the listening socket the service manager
// passed for its path (LISTEN_PID, LISTEN_FDS, descriptors from 3), leaves the
// manager's socket file in place, and binds its own for any other path. Each
// case runs in a child process: the protocol is per process and fixes the
// descriptor numbers.
#include "uipc/core/socket_activation.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/asio/io_context.hpp>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "test_support.hpp"
#include "uipc/core/framed.hpp"
#include "uipc/core/rendezvous.hpp"

namespace uipc {
namespace {

using namespace std::chrono_literals;
using test::temp_dir;

// A listening Unix socket bound to `path`, moved to descriptor `at`.
bool listen_at_fd(const std::string& path, int at) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||  // NOLINT
      ::listen(fd, 8) != 0) {
    return false;
  }
  if (fd == at) return true;
  const bool moved = ::dup2(fd, at) == at;
  ::close(fd);
  return moved;
}

// Sets the service manager's variables as systemd does for `pid`.
void pass_sockets(pid_t pid, int count) {
  ::setenv("LISTEN_PID", std::to_string(pid).c_str(), 1);
  ::setenv("LISTEN_FDS", std::to_string(count).c_str(), 1);
  ::setenv("LISTEN_FDNAMES", "handles", 1);
}

bool connects(const std::string& path) {
  unique_fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
  return ::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0;  // NOLINT
}

bool is_socket_file(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode);
}

// Runs `body` in a child; the child's exit status is the number of the first
// check that failed (0: all held). Bounded: a child still running after 20 s
// is killed and reported as 255.
int in_child(const std::function<int()>& body) {
  const pid_t child = ::fork();
  if (child == 0) ::_exit(body());
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  int status = 0;
  while (::waitpid(child, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      ::kill(child, SIGKILL);
      ::waitpid(child, &status, 0);
      return 255;
    }
    std::this_thread::sleep_for(5ms);
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 254;
}

TEST(SocketActivation, ThePassedSocketForThePathIsTakenAndItsFileLeftInPlace) {
  temp_dir dir;
  const std::string path = dir.file("uipc-handles.sock");
  EXPECT_EQ(
      in_child([&] {
        if (!listen_at_fd(path, 3)) return 1;
        pass_sockets(::getpid(), 1);
        boost::asio::io_context ctx;
        // Not taking what was passed: the path is served (by the manager).
        listener_options own;
        own.inherited = false;
        if (listener::bind(ctx, path, own).error() != errc::address_in_use) return 2;
        auto l = listener::bind(ctx, path);
        if (!l) return 3;
        // Read once and removed, so that a started program does not take them.
        if (std::getenv("LISTEN_FDS") || std::getenv("LISTEN_PID") || std::getenv("LISTEN_FDNAMES"))
          return 4;
        if ((::fcntl(3, F_GETFD) & FD_CLOEXEC) == 0) return 5;
        // Taken once: a second listener of the path is refused.
        if (listener::bind(ctx, path).error() != errc::address_in_use) return 6;
        if (!connects(path)) return 7;
        bool accepted = false;
        (*l)->async_accept_socket([&](error_code ec, unique_fd fd) { accepted = !ec && fd; });
        ctx.run_for(5s);
        if (!accepted) return 8;
        (*l)->close();
        if (!is_socket_file(path)) return 9;  // the manager's file
        if (::access(listener_lock_path(path).c_str(), F_OK) == 0) return 10;
        // Given back, open: a server of the path started again takes it again.
        if (untaken_passed_sockets() != std::vector<std::string>{path}) return 11;
        auto again = listener::bind(ctx, path);
        if (!again) return 12;
        if (!connects(path)) return 13;
        accepted = false;
        (*again)->async_accept_socket([&](error_code ec, unique_fd fd) { accepted = !ec && fd; });
        ctx.restart();
        ctx.run_for(5s);
        if (!accepted) return 14;
        return 0;
      }),
      0);
}

TEST(SocketActivation, APathNotPassedIsBoundAsUsualAndThePassedSocketWaitsForItsOwn) {
  temp_dir dir;
  const std::string passed = dir.file("passed.sock");
  const std::string mine = dir.file("mine.sock");
  EXPECT_EQ(in_child([&] {
              if (!listen_at_fd(passed, 3)) return 1;
              pass_sockets(::getpid(), 1);
              boost::asio::io_context ctx;
              auto l = listener::bind(ctx, mine);
              if (!l) return 2;
              if (!is_socket_file(mine) || !connects(mine)) return 3;
              // What a daemon reports: a socket passed for a path it does not serve.
              if (untaken_passed_sockets() != std::vector<std::string>{passed}) return 4;
              (*l)->close();
              if (is_socket_file(mine)) return 5;  // ours: removed
              auto p = listener::bind(ctx, passed);
              if (!p) return 6;
              if (!untaken_passed_sockets().empty()) return 7;
              (*p)->close();
              if (!is_socket_file(passed)) return 8;
              return 0;
            }),
            0);
}

TEST(SocketActivation, SocketsPassedToAnotherProcessAreNotTaken) {
  temp_dir dir;
  const std::string path = dir.file("uipc-handles.sock");
  EXPECT_EQ(in_child([&] {
              if (!listen_at_fd(path, 3)) return 1;
              pass_sockets(::getppid(), 1);  // e.g. inherited from a parent that was activated
              boost::asio::io_context ctx;
              if (listener::bind(ctx, path).error() != errc::address_in_use) return 2;
              if (std::getenv("LISTEN_FDS")) return 3;
              return 0;
            }),
            0);
}

TEST(SocketActivation, GarbageInTheVariablesPassesNothing) {
  temp_dir dir;
  const std::string path = dir.file("uipc-handles.sock");
  EXPECT_EQ(in_child([&] {
              if (!listen_at_fd(path, 3)) return 1;
              ::setenv("LISTEN_PID", (std::to_string(::getpid()) + "x").c_str(), 1);
              ::setenv("LISTEN_FDS", "1", 1);
              boost::asio::io_context ctx;
              if (listener::bind(ctx, path).error() != errc::address_in_use) return 2;
              return 0;
            }),
            0);
  EXPECT_EQ(in_child([&] {
              if (!listen_at_fd(path + "2", 3)) return 1;
              ::setenv("LISTEN_PID", std::to_string(::getpid()).c_str(), 1);
              ::setenv("LISTEN_FDS", "-1", 1);
              boost::asio::io_context ctx;
              if (listener::bind(ctx, path + "2").error() != errc::address_in_use) return 2;
              return 0;
            }),
            0);
}

TEST(SocketActivation, APassedDescriptorThatIsNotAListeningSocketIsLeftAlone) {
  temp_dir dir;
  const std::string path = dir.file("x.sock");
  EXPECT_EQ(in_child([&] {
              int pair[2];
              if (::socketpair(AF_UNIX, SOCK_STREAM, 0, pair) != 0) return 1;
              if (::dup2(pair[0], 3) != 3) return 2;
              pass_sockets(::getpid(), 1);
              boost::asio::io_context ctx;
              auto l = listener::bind(ctx, path);  // binds its own
              if (!l || !is_socket_file(path)) return 3;
              if (::fcntl(3, F_GETFD) < 0) return 4;  // still open, not closed by us
              return 0;
            }),
            0);
}

// The protocol is per process: a child forked after its parent read (and took)
// what was passed reads its own variables, and never gets the parent's sockets.
TEST(SocketActivation, AChildForkedAfterTheParentReadReadsItsOwn) {
  temp_dir dir;
  const std::string parents = dir.file("parent.sock");
  const std::string childs = dir.file("child.sock");
  EXPECT_EQ(
      in_child([&] {
        if (!listen_at_fd(parents, 3)) return 1;
        pass_sockets(::getpid(), 1);
        adopt_passed_sockets();
        if (untaken_passed_sockets() != std::vector<std::string>{parents}) return 2;
        const int status = in_child([&] {
          // Its own two, the first in the place of the parent's.
          ::close(3);
          if (!listen_at_fd(childs, 3) || !listen_at_fd(childs + "2", 4)) return 1;
          pass_sockets(::getpid(), 2);
          adopt_passed_sockets();  // this process was not read yet
          return untaken_passed_sockets() == std::vector<std::string>{childs, childs + "2"} ? 0 : 2;
        });
        return status == 0 ? 0 : 10 + status;
      }),
      0);
}

}  // namespace
}  // namespace uipc
