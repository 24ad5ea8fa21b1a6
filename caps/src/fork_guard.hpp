// Objects inherited through fork() answer errc::forked_copy: each records the
// fork epoch it was made in, and a pthread_atfork child handler advances it.
#pragma once

#include <cstdint>

namespace uipc::caps::detail {

/// How many fork()s this process descends through (installs the handler once).
std::uint64_t fork_epoch() noexcept;

}  // namespace uipc::caps::detail
