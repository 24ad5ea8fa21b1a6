// Fuzz target: the client's reader of its channel (client_core::drain, wait,
// the replies it hands over), the code that faces whatever a server writes
// into the mapping both share. The mirror of caps_channel.
//
// Input: [calls u8][aborts u8] then the ring as a hostile server leaves it:
// entries of 32 bytes, then an optional count of those in sequence (caps_ring.hpp).
//   calls: 1 + calls % 8 requests are sent first (ids 1, 2, ...);
//   aborts: bit i withdraws call i + 1 before the ring is read.
// Checked beyond "no crash": every reply handed over is a view inside the
// reply arena, each call ends at most once, and the calls in flight never
// exceed the limit.
#include <sys/socket.h>

#include <boost/asio/error.hpp>
#include <boost/asio/io_context.hpp>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "bell.hpp"
#include "caps_ring.hpp"
#include "client_core.hpp"
#include "uipc/core/blocking_connection.hpp"

namespace {

namespace detail = uipc::caps::detail;
using uipc::blocking_connection;
using uipc::shm_segment;
using uipc::unique_fd;

constexpr std::uint32_t max_in_flight = 8;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 2) return 0;
  const unsigned calls = 1 + data[0] % max_in_flight;
  const std::uint8_t aborts = data[1];
  data += 2;
  size -= 2;

  static boost::asio::io_context ctx;
  static const auto layout = detail::channel_layout::of(4096, 4096);  // small: a mapping per input
  auto segment =
      shm_segment::create_anonymous(layout.total, {detail::channel_magic, detail::channel_version});
  if (!segment) std::abort();
  // The control line: a socket pair whose other end plays the server (this
  // process: its credentials are ours, and it is alive).
  int pair[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) != 0) std::abort();
  unique_fd server_end(pair[1]);
  auto ctrl = blocking_connection::adopt(unique_fd(pair[0]));
  if (!ctrl) std::abort();
  auto bells = detail::make_bell_pair();  // the server's end goes with this input
  if (!bells) std::abort();
  auto core =
      std::make_shared<detail::client_core>(ctx, uipc::caps::client_options{}, std::move(*ctrl),
                                            std::move(*segment), layout, std::move(bells->ours));
  core->max_in_flight = max_in_flight;

  const auto now = std::chrono::steady_clock::now();
  for (unsigned i = 0; i < calls; ++i) {
    auto id = core->send(
        16, [](std::span<std::byte> b) { std::memset(b.data(), 'q', b.size()); }, now, nullptr);
    if (!id || *id != i + 1) std::abort();
  }
  for (unsigned i = 0; i < calls; ++i) {
    if (aborts & (1u << i)) (void)core->abort(i + 1, boost::asio::error::operation_aborted);
  }

  // What the server wrote: its ring to us.
  auto& ring = core->shared->to_client;
  uipc::fuzz::write_hostile_ring(ring, data, size);

  const auto* arena = core->reply_arena;
  for (unsigned i = 0; i < calls; ++i) {
    const bool withdrawn = (aborts & (1u << i)) != 0;
    auto r = core->wait(i + 1, now);  // reads the ring; never sleeps past `now`
    if (r) {
      if (withdrawn) std::abort();  // a withdrawn call gives its caller no reply
      const auto v = r->view();
      if (v.size() != 0 &&
          (v.data() < arena || v.data() + v.size() > arena + layout.reply_arena_size))
        std::abort();
    }
    // An outcome is given once: after it, the id is unknown.
    if (r || r.error() != uipc::caps::errc::timed_out) {  // timed out: still in flight
      auto again = core->wait(i + 1, now);
      if (again || again.error() != uipc::caps::errc::unknown_message) std::abort();
    }
    std::lock_guard lock(core->mutex);
    if (core->in_flight > max_in_flight) std::abort();
  }
  return 0;
}
