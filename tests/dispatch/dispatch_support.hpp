// Shared by the dispatcher tests: the DispatcherTest fixture and its message helpers.
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/udp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <cstdlib>
#include <functional>
#include <map>
#include <new>
#include <optional>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

#include "test_support.hpp"
#include "uipc/dispatch/dispatcher.hpp"

namespace uipc::dispatch {
// Not in an unnamed namespace: every test file's TEST_F(DispatcherTest, ...) must
// name the one fixture class (googletest refuses a suite split over several).

namespace asio = boost::asio;
using test::run_until;

const udp::endpoint loopback_any(asio::ip::make_address("127.0.0.1"), 0);

/// A 12-byte DNS-style header with `id`, the QR bit and one payload byte (a tag).
inline std::vector<std::byte> message(std::uint16_t id, bool response, std::uint8_t tag = 0) {
  std::vector<std::byte> m(13, std::byte{0});
  m[0] = static_cast<std::byte>(id >> 8);
  m[1] = static_cast<std::byte>(id & 0xff);
  m[2] = response ? std::byte{0x80} : std::byte{0};
  m[12] = static_cast<std::byte>(tag);
  return m;
}

inline std::uint8_t tag_of(const event& ev) { return std::to_integer<std::uint8_t>(ev.data()[12]); }

/// What a receive completed with, kept for inspection.
struct received {
  error_code ec;
  event ev;
};

class DispatcherTest : public ::testing::Test {
 protected:
  void SetUp() override { fds_before_ = test::descriptors_with_reactor(ctx_); }

  /// Every test ends here: nothing attached, the socket closed, no descriptor left.
  void TearDown() override {
    ctx_.restart();
    ctx_.poll();
    EXPECT_EQ(test::open_fd_count(), fds_before_) << "a descriptor leaked";
  }

  ref_ptr<dispatcher> make(dispatcher_options options = {}, udp::endpoint local = loopback_any) {
    auto d = dispatcher::create(ctx_, local, options);
    EXPECT_TRUE(d) << d.error().message();
    return d ? *d : nullptr;
  }

  udp::socket peer(const char* address = "127.0.0.1") {
    return udp::socket(ctx_, udp::endpoint(asio::ip::make_address(address), 0));
  }

  void send(udp::socket& from, const std::vector<std::byte>& m, const udp::endpoint& to) {
    from.send_to(asio::buffer(m), to);
  }

  /// Starts a receive whose result lands in `out`.
  template <class Party>
  void receive_into(Party& p, std::optional<received>& out) {
    out.reset();
    p.async_receive([&out](error_code ec, event ev) { out.emplace(received{ec, std::move(ev)}); });
  }

  /// Reads one datagram at `s` (with a deadline).
  std::vector<std::byte> read(udp::socket& s, udp::endpoint* from = nullptr) {
    std::vector<std::byte> buf(2048);
    std::optional<std::size_t> got;
    udp::endpoint sender;
    s.async_receive_from(asio::buffer(buf), sender, [&](error_code ec, std::size_t n) {
      EXPECT_FALSE(ec);
      got = n;
    });
    EXPECT_TRUE(run_until(ctx_, [&] { return got.has_value(); }));
    buf.resize(got.value_or(0));
    if (from) *from = sender;
    return buf;
  }

  /// Runs the loop until the dispatcher has read `n` datagrams in all.
  void until_received(const ref_ptr<dispatcher>& d, std::uint64_t n) {
    ASSERT_TRUE(run_until(ctx_, [&] { return d->stats().received >= n; }));
    ctx_.poll();
  }

  asio::io_context ctx_;
  std::size_t fds_before_ = 0;
};

}  // namespace uipc::dispatch
