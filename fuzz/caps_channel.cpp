// Fuzz target: the server's reader of a client's shared-memory channel
// (server_channel::drain), the code that faces whatever a client writes into
// its mapping. The input is the ring as a hostile client leaves it: entries,
// 32 bytes each, then an optional count of those in sequence (caps_ring.hpp).
// Checked beyond "no crash": a reader
// that accepts the ring hands over only payload views inside the request
// arena and never more unanswered messages than the limit.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "caps_ring.hpp"
#include "server_channel.hpp"

namespace {

namespace detail = uipc::caps::detail;
using uipc::peer_identity;
using uipc::server_session;
using uipc::shm_segment;
using uipc::unique_fd;
using uipc::caps::event;
using uipc::caps::event_kind;

constexpr std::uint32_t max_in_flight = 8;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const auto layout = detail::channel_layout::of(64 << 10, 64 << 10);
  auto segment =
      shm_segment::create_anonymous(layout.total, {detail::channel_magic, detail::channel_version});
  if (!segment) std::abort();
  auto session = std::make_shared<server_session>(1, peer_identity{}, unique_fd{}, nullptr);
  auto ch = std::make_shared<detail::server_channel>(session, std::move(*segment), layout,
                                                     max_in_flight, unique_fd{});
  uipc::fuzz::write_hostile_ring(ch->shared->to_server, data, size);

  std::vector<event> out;
  if (ch->drain(out)) {
    const auto* arena = ch->request_arena;
    for (const auto& e : out) {
      if (e.kind != event_kind::request) continue;
      const auto v = e.view();
      if (v.data() < arena || v.data() + v.size() > arena + layout.request_arena_size) std::abort();
    }
    if (ch->awaiting > max_in_flight) std::abort();
  }
  return 0;
}
