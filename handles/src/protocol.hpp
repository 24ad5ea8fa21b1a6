// Frame type numbers of the handles protocol (proto/uipc/proto/handles.proto).
#pragma once

#include <cstdint>

namespace uipc::handles::detail {

enum class request_type : std::uint32_t {
  hello = 1,
  create = 2,
  open = 3,
  close = 4,
  scratch_store = 5,
  scratch_free = 6,
  list = 7,
  stats = 8,
  clients = 9,
};

inline constexpr std::size_t max_request_frame = 64 * 1024;

}  // namespace uipc::handles::detail
