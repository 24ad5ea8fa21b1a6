// The daemon's protocol under bad input, spoken raw over the core's framed
// transport: every bad request gets an error reply and changes nothing.
#include "protocol.hpp"

#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <boost/asio/io_context.hpp>
#include <random>

#include "handles_support.hpp"
#include "uipc/core/framed.hpp"
#include "uipc/core/server.hpp"
#include "uipc/core/typed.hpp"
#include "uipc/proto/handles.pb.h"

namespace uipc::handles {
namespace {

using namespace std::chrono_literals;
namespace pb = uipc::proto::handles;
using test::in_process_daemon;
using test::private_location;

class ProtocolTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(static_cast<bool>(daemon_));
    connection_options co;
    co.error_categories = {&handles_category()};
    auto c = connection::connect(ctx_, loc_.resolved().socket_path, co);
    ASSERT_TRUE(c) << c.error().message();
    conn_ = *c;
    // A well-behaved client holds one named event and one scratch block throughout.
    auto cl = client::connect(loc_.options());
    ASSERT_TRUE(cl);
    other_.emplace(std::move(*cl));
    auto e = other_->create_event(event_reset::manual, false, "kept");
    ASSERT_TRUE(e);
    kept_ = std::move(*e);
    auto b = other_->store_scratch(32);
    ASSERT_TRUE(b);
    block_ = std::move(*b);
    before_ = snapshot();
  }

  void TearDown() override {
    if (conn_) conn_->close();
    ctx_.restart();
    ctx_.run_for(20ms);
    kept_ = event{};
    block_ = scratch_block{};
    other_.reset();
    const auto until = std::chrono::steady_clock::now() + 5s;
    while (daemon_->stats().clients != 0 && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(1ms);
    EXPECT_EQ(daemon_->stats().handles_in_use, 0u);
    EXPECT_EQ(daemon_->stats().scratch_in_use, 0u);
    daemon_.shutdown();
    EXPECT_TRUE(loc_.wait_until_clean(1s));
  }

  // What the daemon holds, as list and stats say (requests and errors aside).
  std::string snapshot(bool with_clients = true) {
    std::string s;
    auto list = other_->list();
    EXPECT_TRUE(list);
    for (const auto& e : *list) {
      s += to_string(e.handle) + " " + to_string(e.type) + " " + std::to_string(e.refcount) + " " +
           e.name + " " + std::to_string(e.value) + "\n";
    }
    const auto st = daemon_->stats();
    s += std::to_string(st.handles_in_use) + " " + std::to_string(st.scratch_in_use) + " " +
         std::to_string(st.scratch_blocks) + (with_clients ? " " + std::to_string(st.clients) : "");
    return s;
  }

  // One raw request; the reply's error (or none) and payload.
  std::pair<error_code, frame> call(std::uint32_t type, std::string payload) {
    frame f;
    f.kind = frame_kind::request;
    f.type = type;
    f.payload = std::move(payload);
    std::optional<std::pair<error_code, frame>> got;
    conn_->async_call(std::move(f), [&](error_code ec, frame r) { got.emplace(ec, std::move(r)); });
    EXPECT_TRUE(uipc::test::run_until(ctx_, [&] { return got.has_value(); }));
    if (!got) return {make_error_code(uipc::errc::timed_out), frame{}};
    return std::move(*got);
  }

  error_code call_error(std::uint32_t type, const google::protobuf::Message& m) {
    return call(type, m.SerializeAsString()).first;
  }

  // Closes the raw connection: everything it held goes with it, and the table
  // is as the well-behaved client left it.
  void close_and_expect_the_table_as_before() {
    conn_->close();
    const auto until = std::chrono::steady_clock::now() + 5s;
    while (daemon_->stats().clients != 1 && std::chrono::steady_clock::now() < until) {
      ctx_.restart();
      ctx_.run_for(1ms);
    }
    EXPECT_EQ(snapshot(false) + " 2", before_);
  }

  static constexpr std::uint32_t max_references = 6;
  private_location loc_;
  in_process_daemon daemon_{loc_.where, 4, 1024, max_references};
  boost::asio::io_context ctx_;
  connection::pointer conn_;
  std::optional<client> other_;
  event kept_;
  scratch_block block_;
  std::string before_;
};

TEST_F(ProtocolTest, GarbagePayloadIsABadRequest) {
  for (std::uint32_t type = 1; type <= 8; ++type) {
    if (type == 1 || type == 7 || type == 8)
      continue;  // empty messages: any bytes that parse are fine
    EXPECT_EQ(call(type, "\xff\xff\xff\xff garbage").first, make_error_code(errc::bad_request))
        << type;
  }
  EXPECT_EQ(snapshot(), before_);
  EXPECT_TRUE(conn_->is_open());
}

TEST_F(ProtocolTest, UnknownRequestTypeIsRefused) {
  EXPECT_EQ(call(0, "").first, make_error_code(errc::unknown_request));
  EXPECT_EQ(call(99, "abc").first, make_error_code(errc::unknown_request));
  EXPECT_EQ(snapshot(), before_);
}

TEST_F(ProtocolTest, BadCreateRequestsChangeNothing) {
  pb::CreateRequest bad_type;
  bad_type.set_type(static_cast<pb::ObjectType>(17));
  EXPECT_EQ(call_error(2, bad_type), make_error_code(errc::bad_request));
  pb::CreateRequest none;
  EXPECT_EQ(call_error(2, none), make_error_code(errc::bad_request));
  pb::CreateRequest sem;
  sem.set_type(pb::SEMAPHORE);
  sem.set_initial_count(3);
  sem.set_max_count(2);
  EXPECT_EQ(call_error(2, sem), make_error_code(errc::bad_request));
  pb::CreateRequest owned;
  owned.set_type(pb::MUTEX);
  owned.set_initial_state(true);  // owned, but by no thread
  EXPECT_EQ(call_error(2, owned), make_error_code(errc::bad_request));
  pb::CreateRequest long_name;
  long_name.set_type(pb::AUTO_EVENT);
  long_name.set_name(std::string(64, 'n'));
  EXPECT_EQ(call_error(2, long_name), make_error_code(errc::name_too_long));
  pb::CreateRequest nul_name;
  nul_name.set_type(pb::AUTO_EVENT);
  nul_name.set_name(std::string("a\0b", 3));
  EXPECT_EQ(call_error(2, nul_name), make_error_code(errc::bad_request));
  pb::CreateRequest other_type;
  other_type.set_type(pb::MUTEX);
  other_type.set_name("kept");
  EXPECT_EQ(call_error(2, other_type), make_error_code(errc::name_in_use));
  EXPECT_EQ(snapshot(), before_);
}

TEST_F(ProtocolTest, BadHandlesAreRefused) {
  pb::OpenRequest out_of_range;
  out_of_range.mutable_handle()->set_index(4);
  out_of_range.mutable_handle()->set_generation(1);
  EXPECT_EQ(call_error(3, out_of_range), make_error_code(errc::invalid_handle));
  pb::OpenRequest huge;
  huge.mutable_handle()->set_index(0xffffffff);
  EXPECT_EQ(call_error(3, huge), make_error_code(errc::invalid_handle));
  pb::OpenRequest stale;
  stale.mutable_handle()->set_index(kept_.handle().index);
  stale.mutable_handle()->set_generation(kept_.handle().generation + 1);
  EXPECT_EQ(call_error(3, stale), make_error_code(errc::stale_handle));
  pb::OpenRequest free_slot;
  free_slot.mutable_handle()->set_index(kept_.handle().index + 1);
  free_slot.mutable_handle()->set_generation(1);
  EXPECT_EQ(call_error(3, free_slot), make_error_code(errc::stale_handle));
  pb::OpenRequest unknown_name;
  unknown_name.set_name("nobody");
  EXPECT_EQ(call_error(3, unknown_name), make_error_code(errc::name_not_found));
  pb::CloseRequest close_stale;
  *close_stale.mutable_handle() = stale.handle();
  EXPECT_EQ(call_error(4, close_stale), make_error_code(errc::stale_handle));
  EXPECT_EQ(snapshot(), before_);
}

TEST_F(ProtocolTest, CloseWithoutAReferenceIsRefused) {
  // The handle is live, but this connection never opened it: the other client's
  // reference must not be dropped on its behalf.
  pb::CloseRequest close;
  close.mutable_handle()->set_index(kept_.handle().index);
  close.mutable_handle()->set_generation(kept_.handle().generation);
  EXPECT_EQ(call_error(4, close), make_error_code(errc::not_held));
  EXPECT_EQ(call_error(4, close), make_error_code(errc::not_held));
  EXPECT_EQ(snapshot(), before_);
  // Open once, close once, then the second close is refused again.
  pb::OpenRequest open;
  *open.mutable_handle() = close.handle();
  EXPECT_FALSE(call_error(3, open));
  EXPECT_FALSE(call_error(4, close));
  EXPECT_EQ(call_error(4, close), make_error_code(errc::not_held));
  EXPECT_EQ(snapshot(), before_);
  EXPECT_FALSE(kept_.signal());
}

TEST_F(ProtocolTest, ReferencesStopAtTheDaemonsLimit) {
  // No count may wrap: a session that could open an object 2^32 times would
  // bring its count back to zero and free it under its other holders.
  pb::OpenRequest open;
  open.mutable_handle()->set_index(kept_.handle().index);
  open.mutable_handle()->set_generation(kept_.handle().generation);
  for (std::uint32_t refs = 1; refs < max_references; ++refs) ASSERT_FALSE(call_error(3, open));
  EXPECT_EQ(call_error(3, open), make_error_code(errc::too_many_references));
  pb::CreateRequest by_name;  // a create of the name is an open too
  by_name.set_type(pb::MANUAL_EVENT);
  by_name.set_name("kept");
  EXPECT_EQ(call_error(2, by_name), make_error_code(errc::too_many_references));
  auto list = other_->list();
  ASSERT_TRUE(list);
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ(list->front().refcount, max_references);
  // One closed, one more fits.
  pb::CloseRequest close;
  *close.mutable_handle() = open.handle();
  EXPECT_FALSE(call_error(4, close));
  EXPECT_FALSE(call_error(2, by_name));
  EXPECT_EQ(call_error(3, open), make_error_code(errc::too_many_references));
  // The refusals took nothing: this connection's references go with it, and
  // the object is the other client's again, alive.
  close_and_expect_the_table_as_before();
  EXPECT_FALSE(kept_.signal());
}

TEST_F(ProtocolTest, ASecondHelloIsRefused) {
  // Each hello's reply carries a descriptor of the segment: a client repeating
  // it without reading would pin the daemon's descriptors, every client's limit.
  auto [first, reply] = call(1, "");
  EXPECT_FALSE(first) << first.message();
  EXPECT_EQ(reply.fds.size(), 1u);
  for (int i = 0; i < 3; ++i) {
    auto [again, refused] = call(1, "");
    EXPECT_EQ(again, make_error_code(errc::already_greeted));
    EXPECT_TRUE(refused.fds.empty());
  }
  EXPECT_TRUE(conn_->is_open());
  EXPECT_EQ(snapshot(), before_);
  // Another connection still gets its hello.
  connection_options co;
  co.error_categories = {&handles_category()};
  auto other = connection::connect(ctx_, loc_.resolved().socket_path, co);
  ASSERT_TRUE(other);
  std::swap(conn_, *other);
  EXPECT_FALSE(call(1, "").first);
  (*other)->close();
}

TEST_F(ProtocolTest, ScratchFreeOfAnUnallocatedOffsetIsRefused) {
  pb::ScratchFreeRequest never;
  never.set_offset(8);
  EXPECT_EQ(call_error(6, never), make_error_code(errc::bad_scratch_offset));
  pb::ScratchFreeRequest others;
  others.set_offset(block_.offset());  // allocated, but by the other client
  EXPECT_EQ(call_error(6, others), make_error_code(errc::bad_scratch_offset));
  pb::ScratchFreeRequest beyond;
  beyond.set_offset(1ULL << 40);
  EXPECT_EQ(call_error(6, beyond), make_error_code(errc::bad_scratch_offset));
  pb::ScratchStoreRequest zero;
  EXPECT_EQ(call_error(5, zero), make_error_code(errc::bad_request));
  pb::ScratchStoreRequest too_big;
  too_big.set_size(1ULL << 40);
  EXPECT_EQ(call_error(5, too_big), make_error_code(errc::scratch_exhausted));
  EXPECT_EQ(snapshot(), before_);
}

TEST_F(ProtocolTest, FullTableIsRefused) {
  pb::CreateRequest create;
  create.set_type(pb::AUTO_EVENT);
  EXPECT_FALSE(call_error(2, create));
  EXPECT_FALSE(call_error(2, create));
  EXPECT_EQ(call_error(2, create), make_error_code(errc::table_full));  // capacity 4: slots 1..3
  EXPECT_EQ(daemon_->stats().handles_in_use, 3u);
  conn_->close();  // its two references go with it
  const auto until = std::chrono::steady_clock::now() + 5s;
  while (daemon_->stats().handles_in_use != 1 && std::chrono::steady_clock::now() < until) {
    ctx_.restart();
    ctx_.run_for(1ms);
  }
  EXPECT_EQ(snapshot(false) + " 2", before_);
  EXPECT_EQ(daemon_->stats().clients, 1u);
}

TEST_F(ProtocolTest, OversizedFrameClosesOnlyThatConnection) {
  // A length prefix above the daemon's 64 KiB limit, on a raw socket.
  const std::string path = loc_.resolved().socket_path;
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size());
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  const std::uint32_t length = 1u << 20;  // little-endian prefix of 1 MiB
  ASSERT_EQ(::send(fd, &length, sizeof length, MSG_NOSIGNAL), 4);
  char buf[256];
  // The daemon closes it (after an error frame where it can).
  timeval tv{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ssize_t n = 0;
  while ((n = ::recv(fd, buf, sizeof buf, 0)) > 0) {
  }
  EXPECT_EQ(n, 0);
  ::close(fd);
  EXPECT_EQ(snapshot(), before_);
  EXPECT_FALSE(kept_.signal());
}

TEST_F(ProtocolTest, ShortAndGarbageFramesChangeNothing) {
  const std::string path = loc_.resolved().socket_path;
  for (int variant = 0; variant < 2; ++variant) {
    int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.c_str(), path.size());
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    if (variant == 0) {
      const std::uint32_t length = 100;  // announces 100 bytes, sends 3, hangs up
      ASSERT_EQ(::send(fd, &length, sizeof length, MSG_NOSIGNAL), 4);
      ASSERT_EQ(::send(fd, "abc", 3, MSG_NOSIGNAL), 3);
    } else {
      const std::uint32_t length = 8;  // eight bytes that are no envelope
      ASSERT_EQ(::send(fd, &length, sizeof length, MSG_NOSIGNAL), 4);
      ASSERT_EQ(::send(fd, "\xff\xff\xff\xff\xff\xff\xff\xff", 8, MSG_NOSIGNAL), 8);
      char buf[256];
      timeval tv{5, 0};
      ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
      ssize_t n = 0;
      while ((n = ::recv(fd, buf, sizeof buf, 0)) > 0) {
      }
      EXPECT_EQ(n, 0);  // the daemon hung up on it
    }
    ::close(fd);
  }
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(snapshot(), before_);
  EXPECT_FALSE(kept_.signal());
  // The raw connection of the fixture still works.
  EXPECT_FALSE(call(1, "").first);
}

TEST_F(ProtocolTest, RandomRequestsLeaveTheTableAsItWasOnceTheirSenderLeaves) {
  // A small fuzzer: random payloads for every request type (and some unknown
  // ones). Each gets a reply; once the sender leaves, whatever it managed to
  // create or allocate is gone again and the other client was never disturbed.
  std::mt19937 random(12345);
  for (int i = 0; i < 400; ++i) {
    const auto type = static_cast<std::uint32_t>(random() % 10);
    std::string payload(random() % 24, '\0');
    for (auto& ch : payload) ch = static_cast<char>(random());
    auto [ec, reply] = call(type, payload);
    EXPECT_TRUE(!ec || ec.category() == handles_category()) << ec.message();
    ASSERT_TRUE(conn_->is_open());
  }
  EXPECT_FALSE(kept_.signal());  // the other client's object still works
  EXPECT_FALSE(kept_.reset());
  close_and_expect_the_table_as_before();
}

TEST_F(ProtocolTest, ListAndStatsDescribeTheTable) {
  auto [ec, reply] = call(8, "");
  ASSERT_FALSE(ec);
  pb::StatsReply stats;
  ASSERT_TRUE(stats.ParseFromString(reply.payload));
  EXPECT_EQ(stats.capacity(), 4u);
  EXPECT_EQ(stats.handles_in_use(), 1u);
  EXPECT_EQ(stats.clients(), 2u);
  EXPECT_EQ(stats.daemon_pid(), ::getpid());
  auto [ec2, listed] = call(7, "");
  ASSERT_FALSE(ec2);
  pb::ListReply list;
  ASSERT_TRUE(list.ParseFromString(listed.payload));
  ASSERT_EQ(list.entries_size(), 1);
  EXPECT_EQ(list.entries(0).name(), "kept");
  EXPECT_EQ(list.entries(0).type(), pb::MANUAL_EVENT);
}

TEST_F(ProtocolTest, SecondDaemonOnTheSameLocationIsRefused) {
  boost::asio::io_context ctx;
  daemon_options o;
  o.where = loc_.where;
  auto second = handle_daemon::start(ctx, o);
  ASSERT_FALSE(second);
  EXPECT_EQ(second.error(), make_error_code(uipc::errc::address_in_use));
  EXPECT_EQ(snapshot(), before_);
  EXPECT_FALSE(kept_.signal());
}

TEST(IncompatibleDaemonTest, ADaemonOfAnotherBuildIsReportedNotRetried) {
  // A daemon of a build with another segment layout serves the location (an
  // upgrade while the old one runs): its hello says so, and connect() reports
  // it at once instead of starting a successor that cannot take the location.
  private_location loc;
  boost::asio::io_context ctx;
  request_router router;
  int hellos = 0;
  router.on<pb::HelloRequest, pb::HelloReply>(
      static_cast<std::uint32_t>(detail::request_type::hello),
      [&](request_context&, const pb::HelloRequest&) -> result<pb::HelloReply> {
        ++hellos;
        pb::HelloReply out;
        out.set_daemon_pid(static_cast<std::int32_t>(::getpid()));
        out.set_capacity(64);
        out.set_layout_version(2);  // the layout before the death word
        return out;
      });
  server_options so;
  so.listen.connection.error_categories = {&handles_category()};
  auto other_build = server::start(ctx, loc.resolved().socket_path, router, std::move(so));
  ASSERT_TRUE(other_build) << other_build.error().message();
  std::thread serving([&] { ctx.run_for(10s); });
  const auto start = std::chrono::steady_clock::now();
  auto c = client::connect(loc.options());
  const auto took = std::chrono::steady_clock::now() - start;
  ctx.stop();
  serving.join();
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error(), make_error_code(errc::incompatible_daemon)) << c.error().message();
  EXPECT_EQ(hellos, 1);
  EXPECT_LT(took, 5s);  // no start attempt waited out
  EXPECT_TRUE(loc.daemon_pids().empty());
}

}  // namespace
}  // namespace uipc::handles
