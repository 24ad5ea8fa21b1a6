// The framed transport against peers that misbehave: each gets a clear error,
// its connection is closed, and other connections carry on.
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <boost/asio/io_context.hpp>
#include <cstring>

#include "raw_peer.hpp"
#include "test_support.hpp"
#include "uipc/core/framed.hpp"
#include "uipc/proto/envelope.pb.h"

namespace uipc {
namespace {

using test::run_until;

using test::envelope_bytes;
using test::make_raw_peer;
using test::prefix;

void write_all(int fd, const std::string& bytes) {
  ASSERT_EQ(::write(fd, bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
}

// Reads what the connection told the raw peer before closing: one error notice.
std::optional<proto::Envelope> read_notice(int fd) {
  std::string buf(4096, '\0');
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, 2000) != 1) return std::nullopt;
  const ssize_t n = ::read(fd, buf.data(), buf.size());
  if (n < 4) return std::nullopt;
  std::uint32_t length = 0;
  std::memcpy(&length, buf.data(), 4);
  if (n < static_cast<ssize_t>(4 + length)) return std::nullopt;
  proto::Envelope env;
  if (!env.ParseFromArray(buf.data() + 4, static_cast<int>(length))) return std::nullopt;
  return env;
}

// Whatever the peer did, every descriptor it sent or we opened is closed (loop_test).
class FramedBadInputTest : public test::loop_test {
 protected:
  // Waits until `c` closes; returns why.
  error_code wait_closed(const connection::pointer& c) {
    bool done = false;
    error_code reason;
    c->async_receive([&](error_code ec, frame) {
      reason = ec;
      done = true;
    });
    run_until(ctx_, [&] { return done; });
    return reason;
  }

  // A healthy pair still works on the same loop.
  void expect_others_carry_on() {
    auto pair = connection::pair(ctx_);
    ASSERT_TRUE(pair);
    auto [a, b] = *pair;
    b->async_receive([b](error_code ec, frame f) {
      if (!ec) b->async_send(make_reply(f, 0, "pong"), [](error_code) {});
    });
    bool ok = false;
    frame ping;
    ping.payload = "ping";
    a->async_call(std::move(ping),
                  [&](error_code ec, frame f) { ok = !ec && f.payload == "pong"; });
    ASSERT_TRUE(run_until(ctx_, [&] { return ok; }));
    a->close();
    b->close();
  }
};

TEST_F(FramedBadInputTest, LengthAboveTheMaximumClosesWithFrameTooLarge) {
  connection_options options;
  options.max_frame_size = 1024;
  auto peer = make_raw_peer(ctx_, options);
  write_all(peer.raw.get(), prefix(1u << 30));
  EXPECT_EQ(wait_closed(peer.conn), make_error_code(errc::frame_too_large));
  auto notice = read_notice(peer.raw.get());
  ASSERT_TRUE(notice) << "the peer should be told why";
  EXPECT_EQ(notice->error().category(), "uipc.core");
  EXPECT_EQ(notice->error().value(), static_cast<int>(errc::frame_too_large));
  expect_others_carry_on();
}

TEST_F(FramedBadInputTest, FrameCutShortByThePeerClosingIsShortFrame) {
  auto peer = make_raw_peer(ctx_);
  proto::Envelope env;
  env.set_kind(proto::Envelope::NOTICE);
  env.set_payload(std::string(100, 'x'));
  std::string bytes = envelope_bytes(env);
  write_all(peer.raw.get(), bytes.substr(0, bytes.size() / 2));
  peer.raw.reset();
  EXPECT_EQ(wait_closed(peer.conn), make_error_code(errc::short_frame));
  EXPECT_EQ(peer.conn->stats().frames_received, 0u) << "nothing acted upon";
  expect_others_carry_on();
}

TEST_F(FramedBadInputTest, GarbageIsBadFrame) {
  auto peer = make_raw_peer(ctx_);
  write_all(peer.raw.get(), prefix(8) + std::string("\xff\xff\xff\xff\xff\xff\xff\xff", 8));
  EXPECT_EQ(wait_closed(peer.conn), make_error_code(errc::bad_frame));
  EXPECT_TRUE(read_notice(peer.raw.get()));
  expect_others_carry_on();
}

TEST_F(FramedBadInputTest, UnknownKindIsBadFrame) {
  auto peer = make_raw_peer(ctx_);
  proto::Envelope env;
  env.set_kind(static_cast<proto::Envelope::Kind>(42));
  env.set_correlation_id(1);
  write_all(peer.raw.get(), envelope_bytes(env));
  EXPECT_EQ(wait_closed(peer.conn), make_error_code(errc::bad_frame));
}

TEST_F(FramedBadInputTest, RequestWithoutCorrelationIdIsBadFrame) {
  auto peer = make_raw_peer(ctx_);
  proto::Envelope env;
  env.set_kind(proto::Envelope::REQUEST);
  env.set_payload("x");
  write_all(peer.raw.get(), envelope_bytes(env));
  EXPECT_EQ(wait_closed(peer.conn), make_error_code(errc::bad_frame));
}

TEST_F(FramedBadInputTest, ZeroLengthFrameIsBadFrame) {
  auto peer = make_raw_peer(ctx_);
  write_all(peer.raw.get(), prefix(0));
  EXPECT_EQ(wait_closed(peer.conn), make_error_code(errc::bad_frame));
}

TEST_F(FramedBadInputTest, DescriptorsAnnouncedButNotSentIsBadFrame) {
  auto peer = make_raw_peer(ctx_);
  proto::Envelope env;
  env.set_kind(proto::Envelope::NOTICE);
  env.set_fd_count(2);
  write_all(peer.raw.get(), envelope_bytes(env));
  EXPECT_EQ(wait_closed(peer.conn), make_error_code(errc::bad_frame));
}

TEST_F(FramedBadInputTest, TooManyDescriptorsIsRefusedAndTheyAreClosed) {
  connection_options options;
  options.max_fds_per_frame = 2;
  auto peer = make_raw_peer(ctx_, options);
  const std::size_t fds_before = test::open_fd_count();
  proto::Envelope env;
  env.set_kind(proto::Envelope::NOTICE);
  env.set_fd_count(3);
  const std::string bytes = envelope_bytes(env);
  ASSERT_EQ(test::send_with_descriptors(peer.raw.get(), bytes, 3),
            static_cast<ssize_t>(bytes.size()));
  EXPECT_EQ(wait_closed(peer.conn), make_error_code(errc::too_many_fds));
  EXPECT_LE(test::open_fd_count(), fds_before) << "received descriptors leaked";
}

TEST_F(FramedBadInputTest, SilentPeerIsDroppedAfterTheFirstFrameTimeout) {
  connection_options options;
  options.first_frame_timeout = std::chrono::milliseconds(100);
  auto peer = make_raw_peer(ctx_, options);
  EXPECT_EQ(wait_closed(peer.conn), make_error_code(errc::timed_out));
  expect_others_carry_on();
}

TEST_F(FramedBadInputTest, StalledFrameIsDroppedAfterThePartialFrameTimeout) {
  connection_options options;
  options.partial_frame_timeout = std::chrono::milliseconds(100);
  auto peer = make_raw_peer(ctx_, options);
  write_all(peer.raw.get(), prefix(100) + "only a little");
  EXPECT_EQ(wait_closed(peer.conn), make_error_code(errc::timed_out));
}

TEST_F(FramedBadInputTest, PeerThatSendsFasterThanItReadsIsThrottled) {
  connection_options options;
  options.max_queued_frames = 8;
  options.max_queued_send_bytes = 64 * 1024;
  auto peer = make_raw_peer(ctx_, options);
  ASSERT_EQ(::fcntl(peer.raw.get(), F_SETFL, O_NONBLOCK), 0);
  // The server answers every request with 4 KiB; the peer never reads.
  std::function<void()> serve = [&] {
    peer.conn->async_receive([&](error_code ec, frame f) {
      if (ec) return;
      peer.conn->async_send(make_reply(f, 0, std::string(4096, 'r')), [](error_code) {});
      serve();
    });
  };
  serve();
  proto::Envelope env;
  env.set_kind(proto::Envelope::REQUEST);
  env.set_payload(std::string(200, 'q'));
  std::size_t written = 0;
  for (std::uint64_t id = 1; id <= 20000; ++id) {
    env.set_correlation_id(id);
    const std::string bytes = envelope_bytes(env);
    const ssize_t n = ::write(peer.raw.get(), bytes.data(), bytes.size());
    if (n != static_cast<ssize_t>(bytes.size())) break;  // our socket buffer is full: throttled
    ++written;
    if (id % 64 == 0) ctx_.poll();
  }
  ctx_.run_for(std::chrono::milliseconds(100));
  EXPECT_LT(written, 20000u) << "the sender was never slowed down";
  const auto stats = peer.conn->stats();
  // Bounded: the send limit plus the replies to frames already queued when reading paused.
  EXPECT_LE(stats.queued_send_bytes,
            options.max_queued_send_bytes + (options.max_queued_frames + 1) * 4200);
  EXPECT_LE(stats.queued_frames, options.max_queued_frames);
  EXPECT_TRUE(peer.conn->is_open());
  expect_others_carry_on();
  peer.conn->close();
}

TEST_F(FramedBadInputTest, LateReplyToNoCallIsCountedAndDropped) {
  auto peer = make_raw_peer(ctx_);
  proto::Envelope env;
  env.set_kind(proto::Envelope::REPLY);
  env.set_correlation_id(12345);
  write_all(peer.raw.get(), envelope_bytes(env));
  ASSERT_TRUE(run_until(ctx_, [&] { return peer.conn->stats().replies_dropped == 1; }));
  EXPECT_TRUE(peer.conn->is_open());
  peer.conn->close();
}

}  // namespace
}  // namespace uipc

namespace uipc {
namespace {

// A cheap fuzzer: random bytes, random lengths, sometimes behind a plausible
// prefix. Whatever arrives, the connection either delivers well-formed frames or
// closes with a core error; it never crashes, hangs or leaks (ASan/UBSan run this).
TEST_F(FramedBadInputTest, RandomBytesNeverCrashOrHang) {
  std::uint64_t state = 0x9e3779b97f4a7c15ull;
  auto next = [&state] {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  };
  for (int round = 0; round < 300; ++round) {
    connection_options options;
    options.max_frame_size = 4096;
    auto peer = make_raw_peer(ctx_, options);
    std::string bytes(next() % 600, '\0');
    for (auto& b : bytes) b = static_cast<char>(next());
    if (round % 2 == 0 && bytes.size() >= 4) {
      const auto length = static_cast<std::uint32_t>(bytes.size() - 4 - next() % 3);
      std::memcpy(bytes.data(), &length, 4);
    }
    if (!bytes.empty()) write_all(peer.raw.get(), bytes);
    peer.raw.reset();  // then the peer goes: every connection must end
    bool ended = false;
    error_code reason;
    std::function<void()> drain = [&] {
      peer.conn->async_receive([&](error_code ec, frame) {
        if (ec) {
          reason = ec;
          ended = true;
        } else {
          drain();
        }
      });
    };
    drain();
    ASSERT_TRUE(run_until(ctx_, [&] { return ended; })) << "round " << round;
    EXPECT_EQ(&reason.category(), &core_category())
        << "round " << round << ": " << reason.message();
  }
}

}  // namespace
}  // namespace uipc
