// What every fuzz target shares: reading the structured input, a descriptor
// census (a leaked descriptor is a bug as much as a leaked byte), and checks
// that stop the run with a message.
#pragma once

#include <fcntl.h>
#include <sys/socket.h>
#ifdef UIPC_FUZZING
#include <sanitizer/common_interface_defs.h>
#endif
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace uipc::fuzz {

/// Stops the run: libFuzzer saves the input that got here as a crash.
[[noreturn]] inline void fail(const char* what, const char* file, int line) {
  std::fprintf(stderr, "fuzz check failed: %s (%s:%d)\n", what, file, line);
  std::abort();
}
#define UIPC_FUZZ_CHECK(cond) ((cond) ? (void)0 : ::uipc::fuzz::fail(#cond, __FILE__, __LINE__))

/// Takes the input apart front to back; running out yields zeros and empty spans.
class input {
 public:
  input(const std::uint8_t* data, std::size_t size) : data_(data), left_(size) {}
  bool empty() const noexcept { return left_ == 0; }
  std::uint8_t byte() {
    if (left_ == 0) return 0;
    --left_;
    return *data_++;
  }
  std::uint16_t u16() {
    const std::uint16_t lo = byte();
    return static_cast<std::uint16_t>(lo | byte() << 8);
  }
  std::span<const std::uint8_t> bytes(std::size_t n) {
    if (n > left_) n = left_;
    std::span<const std::uint8_t> out(data_, n);
    data_ += n;
    left_ -= n;
    return out;
  }

 private:
  const std::uint8_t* data_;
  std::size_t left_;
};

/// Builds inputs in the same format (for the seed corpora).
class output {
 public:
  output& byte(std::uint8_t b) {
    bytes_.push_back(static_cast<char>(b));
    return *this;
  }
  output& u16(std::uint16_t v) {
    return byte(static_cast<std::uint8_t>(v & 0xff)).byte(static_cast<std::uint8_t>(v >> 8));
  }
  output& append(const std::string& s) {
    bytes_ += s;
    return *this;
  }
  const std::string& str() const noexcept { return bytes_; }

 private:
  std::string bytes_;
};

/// The descriptors open at one moment, among the lowest `span` numbers above
/// the highest one seen at construction. changed() tells whether any was
/// opened or closed since: a few dozen fcntl calls, cheap enough per input.
class fd_census {
 public:
  fd_census() {
    // The sanitizers start their symbolizer (a child on two pipes) the first
    // time they name a function, as libFuzzer does for each new one it covers:
    // started now, its pipes are part of the picture.
#ifdef UIPC_FUZZING
    char name[64];
    __sanitizer_symbolize_pc(__builtin_return_address(0), "%f", name, sizeof name);
#endif
    int highest = 0;
    for (int fd = 0; fd < 1024; ++fd) {
      if (::fcntl(fd, F_GETFD) != -1) highest = fd;
    }
    open_.resize(static_cast<std::size_t>(highest) + 64);
    for (std::size_t fd = 0; fd < open_.size(); ++fd)
      open_[fd] = ::fcntl(static_cast<int>(fd), F_GETFD) != -1;
    while (probe_source_ < highest && !open_[static_cast<std::size_t>(probe_source_)])
      ++probe_source_;
  }
  /// The first descriptor whose state differs, or -1. Every call checks the
  /// lowest free descriptor (one system call: a descriptor left open by the
  /// input just run is most often the lowest it took); every 64th, and the
  /// first, compares them all (a system call each, most of a fast target's time).
  int changed() {
    const int lowest = ::fcntl(probe_source_, F_DUPFD, 0);
    ::close(lowest);
    if (lowest_free_ == -1) lowest_free_ = lowest;
    if (lowest != lowest_free_) return lowest_free_;
    if (calls_++ % 64 != 0) return -1;
    for (std::size_t fd = 0; fd < open_.size(); ++fd) {
      if ((::fcntl(static_cast<int>(fd), F_GETFD) != -1) != open_[fd]) return static_cast<int>(fd);
    }
    return -1;
  }

 private:
  std::vector<bool> open_;
  int probe_source_ = 0;  // any open descriptor will do: stdin
  int lowest_free_ = -1;
  unsigned calls_ = 0;
};

/// Fails the run when a descriptor changed state since `census` was taken
/// (nothing before the census exists).
inline void check_no_descriptor_changed(const std::unique_ptr<fd_census>& census) {
  if (!census) return;
  const int leaked = census->changed();
  if (leaked != -1) std::fprintf(stderr, "descriptor %d changed state\n", leaked);
  UIPC_FUZZ_CHECK(leaked == -1);
}

/// Reads what is waiting on a stream socket, without waiting, into `buf`, and
/// closes any descriptors that came with it (the harness's side never keeps
/// them). recvmsg's result: bytes read, 0 at the end, -1 with errno.
inline ssize_t receive_closing_fds(int fd, char* buf, std::size_t size) {
  char control[CMSG_SPACE(sizeof(int) * 64)] = {};
  iovec iov{buf, size};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  const ssize_t n = ::recvmsg(fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  if (n <= 0) return n;
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const std::size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (std::size_t i = 0; i < count; ++i) {
      int passed;
      std::memcpy(&passed, CMSG_DATA(c) + i * sizeof(int), sizeof passed);
      ::close(passed);
    }
  }
  return n;
}

/// One input of a target whose fixture (`fx.census`) counts descriptors: the
/// loop opens its reactor's descriptors on first use, so the census is taken
/// after one empty run.
template <class Fixture, class Run>
int run_counted(Fixture& fx, Run&& run_one, const std::uint8_t* data, std::size_t size) {
  if (!fx.census) {
    run_one(nullptr, 0);
    fx.census = std::make_unique<fd_census>();
  }
  run_one(data, size);
  return 0;
}

}  // namespace uipc::fuzz
