// unique_fd: closing the descriptor.
#include "uipc/core/unique_fd.hpp"

#include <unistd.h>

namespace uipc {

void unique_fd::reset(int fd) noexcept {
  if (fd_ >= 0 && fd_ != fd) ::close(fd_);
  fd_ = fd;
}

}  // namespace uipc
