// A hostile client writes its channel as it likes. The server reads each index,
// length and state once, checks it, and drops that client alone with
// protocol_violation; the service and every other client carry on.
#include <sys/eventfd.h>
#include <unistd.h>

#include <random>

#include "caps_support.hpp"
#include "channel.hpp"
#include "uipc/core/blocking_connection.hpp"
#include "uipc/core/shm.hpp"
#include "uipc/proto/caps.pb.h"

namespace uipc::caps::test {
namespace {

using detail::entry;
using detail::entry_kind;

// A client speaking the protocol by hand.
struct raw_client {
  blocking_connection ctrl;
  shm_segment segment;
  detail::channel_shared* shared;
  unique_fd server_bell;
  std::uint32_t tail = 0;

  static raw_client connect(const std::string& socket_path) {
    connection_options co;
    co.error_categories.push_back(&caps_category());
    auto c = blocking_connection::connect(socket_path, co);
    EXPECT_TRUE(c);
    auto welcome = c->receive(in(5s));
    EXPECT_TRUE(welcome);
    EXPECT_EQ(welcome->fds.size(), 3u);
    auto seg = shm_segment::open_fd(std::move(welcome->fds[0]), {detail::channel_magic, detail::channel_version});
    EXPECT_TRUE(seg);
    frame hello;
    hello.kind = frame_kind::notice;
    hello.type = proto::caps::HELLO;
    EXPECT_FALSE(c->send(std::move(hello), in(5s)));
    auto* shared = static_cast<detail::channel_shared*>(seg->data());
    return raw_client{std::move(*c), std::move(*seg), shared, std::move(welcome->fds[1])};
  }

  void put(entry e) {
    std::memcpy(&shared->to_server.entries[tail % detail::ring_entries], &e, sizeof e);
    shared->to_server.tail.store(++tail);
  }
  void ring() {
    const eventfd_t one = 1;
    (void)::write(server_bell.get(), &one, sizeof one);
  }
  // What the server said when it hung up (the error notice), or success if it did not.
  error_code hung_up_because() {
    auto r = ctrl.receive(in(5s));
    return r ? error_code{} : r.error();
  }
};

class ChannelAbuse : public caps_test {
 protected:
  void SetUp() override {
    auto s = serve("abused");
    ASSERT_TRUE(s);
    svc_ = std::move(*s);
    echo_ = std::make_unique<responder>(*svc_);
    auto g = connect("abused");
    ASSERT_TRUE(g);
    good_ = std::move(*g);
    for (const auto& f : std::filesystem::directory_iterator(*points_directory(::geteuid(), dir_.path()))) {
      if (f.path().extension() == ".sock") path_ = f.path().string();
    }
  }
  void expect_dropped(raw_client& bad) {
    EXPECT_EQ(bad.hung_up_because(), make_error_code(errc::protocol_violation));
    auto r = good_->call("unharmed", in(5s));
    ASSERT_TRUE(r) << r.error().message();
    EXPECT_EQ(r->copy(), "unharmed");
    for (int i = 0; i < 500 && svc_->stats().clients != 1; ++i) std::this_thread::sleep_for(1ms);
    EXPECT_EQ(svc_->stats().clients, 1u);
    EXPECT_GE(svc_->stats().protocol_violations, 1u);
  }

  std::unique_ptr<service> svc_;
  std::unique_ptr<responder> echo_;
  std::unique_ptr<client> good_;
  std::string path_;
};

TEST_F(ChannelAbuse, ATailBeyondTheRing) {
  auto bad = raw_client::connect(path_);
  bad.shared->to_server.tail.store(10'000);
  bad.ring();
  expect_dropped(bad);
}

TEST_F(ChannelAbuse, APayloadOutsideTheArena) {
  auto bad = raw_client::connect(path_);
  bad.put({static_cast<std::uint32_t>(entry_kind::request), 0, 1, ~std::uint64_t{0} - 10, 100});
  bad.ring();
  expect_dropped(bad);
}

TEST_F(ChannelAbuse, ALengthThatWrapsAround) {
  auto bad = raw_client::connect(path_);
  bad.put({static_cast<std::uint32_t>(entry_kind::request), 0, 1, 64, ~std::uint64_t{0} - 32});
  bad.ring();
  expect_dropped(bad);
}

TEST_F(ChannelAbuse, AnIdTwiceInFlight) {
  auto bad = raw_client::connect(path_);
  echo_ = std::make_unique<responder>(*svc_, [](service&, const event&) {});  // nobody answers: both in flight
  bad.put({static_cast<std::uint32_t>(entry_kind::request), 0, 7, 0, 8});
  bad.put({static_cast<std::uint32_t>(entry_kind::request), 0, 7, 64, 8});
  bad.ring();
  EXPECT_EQ(bad.hung_up_because(), make_error_code(errc::protocol_violation));
}

TEST_F(ChannelAbuse, MoreInFlightThanTheLimit) {
  auto bad = raw_client::connect(path_);
  echo_ = std::make_unique<responder>(*svc_, [](service&, const event&) {});
  for (std::uint64_t id = 1; id <= 129; ++id) bad.put({static_cast<std::uint32_t>(entry_kind::request), 0, id, 0, 8});
  bad.ring();
  EXPECT_EQ(bad.hung_up_because(), make_error_code(errc::protocol_violation));
}

TEST_F(ChannelAbuse, ADisposeOfAMessageNeverAnswered) {
  auto bad = raw_client::connect(path_);
  bad.put({static_cast<std::uint32_t>(entry_kind::dispose), 0, 42, 0, 0});
  bad.ring();
  expect_dropped(bad);
}

TEST_F(ChannelAbuse, AnUnknownEntryKind) {
  auto bad = raw_client::connect(path_);
  bad.put({99, 0, 1, 0, 0});
  bad.ring();
  expect_dropped(bad);
}

TEST_F(ChannelAbuse, RandomWritesWhileCallsRun) {
  auto bad = raw_client::connect(path_);
  std::atomic<bool> stop{false};
  std::thread scribbler([&] {
    std::mt19937_64 random(12345);
    auto* base = reinterpret_cast<unsigned char*>(bad.shared);
    const std::size_t span = sizeof(detail::channel_shared);
    while (!stop.load()) {
      for (int i = 0; i < 256; ++i) base[random() % span] = static_cast<unsigned char>(random());
      bad.ring();
    }
  });
  for (int i = 0; i < 300; ++i) {
    auto r = good_->call("call " + std::to_string(i), in(5s));
    ASSERT_TRUE(r) << i << ": " << r.error().message();
    ASSERT_EQ(r->copy(), "call " + std::to_string(i));
  }
  stop = true;
  scribbler.join();
  EXPECT_EQ(bad.hung_up_because(), make_error_code(errc::protocol_violation));
  EXPECT_GE(svc_->stats().protocol_violations, 1u);
}

}  // namespace
}  // namespace uipc::caps::test
