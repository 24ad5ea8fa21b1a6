// Whether another process still lives: by pidfd where the kernel has them, by pid
// otherwise. Every module that watches a peer or a daemon asks here.
#pragma once

#include <sys/types.h>

#include <cstdint>

#include "uipc/core/unique_fd.hpp"

namespace uipc {

/// A pidfd of process `pid` (pidfd_open); empty where the kernel has none
/// (before Linux 5.3) or the process is gone.
unique_fd open_pidfd(pid_t pid) noexcept;

/// Whether the process of `pidfd` has exited (the pidfd is readable). Never blocks.
bool pidfd_exited(int pidfd) noexcept;

/// Whether process `pid` exists and is not a zombie (kill(pid, 0), then its
/// /proc state). Racy against pid reuse: prefer a pidfd where one can be had.
bool process_alive(std::int32_t pid) noexcept;

/// How many fork()s (without exec) this process is from the one that first
/// asked: a pthread_atfork child handler, installed by the first call, counts
/// them. An object that records it when it is made can tell the copy a fork
/// gave a child: such a copy must leave alone what the parent still uses (no
/// shutdown of shared sockets, no removal of its files, no write to its
/// shared memory). Lock-free; cheap enough for every call.
std::uint64_t fork_epoch() noexcept;

/// What an object that must tell a forked child's copy of itself keeps: the
/// fork epoch it was made in.
class fork_guard {
 public:
  /// True in a child made by fork() since this object was made.
  bool forked_copy() const noexcept { return made_in_ != fork_epoch(); }

 private:
  std::uint64_t made_in_ = fork_epoch();
};

}  // namespace uipc
