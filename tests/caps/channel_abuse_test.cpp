// A hostile client writes its channel as it likes. The server reads each index,
// length and state once, checks it, and drops that client alone with
// protocol_violation; the service and every other client carry on.
#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <climits>
#include <cstring>
#include <future>
#include <optional>
#include <random>

#include "bell.hpp"
#include "caps_support.hpp"
#include "channel.hpp"
#include "points_dir.hpp"
#include "uipc/core/blocking_connection.hpp"
#include "uipc/core/futex.hpp"
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
  unique_fd bell;          // its end of the doorbells
  std::uint32_t next = 0;  // the position of the next entry

  static raw_client connect(const std::string& socket_path) {
    connection_options co;
    co.error_categories.push_back(&caps_category());
    auto c = blocking_connection::connect(socket_path, co);
    EXPECT_TRUE(c);
    auto welcome = c->receive(in(5s));
    EXPECT_TRUE(welcome);
    EXPECT_EQ(welcome->fds.size(), 2u);
    auto seg = shm_segment::open_fd(std::move(welcome->fds[0]),
                                    {detail::channel_magic, detail::channel_version});
    EXPECT_TRUE(seg);
    frame hello;
    hello.kind = frame_kind::notice;
    hello.type = proto::caps::HELLO;
    EXPECT_FALSE(c->send(std::move(hello), in(5s)));
    auto* shared = static_cast<detail::channel_shared*>(seg->data());
    return raw_client{std::move(*c), std::move(*seg), shared, std::move(welcome->fds[1])};
  }

  // Writes `e` at `position` with the sequence of `stamp` (the right one: the same).
  void put_at(std::uint32_t position, entry e, std::uint32_t stamp) {
    entry& slot = shared->to_server.entries[position % detail::ring_entries];
    std::memcpy(reinterpret_cast<char*>(&slot) + 4, reinterpret_cast<const char*>(&e) + 4,
                sizeof e - 4);
    std::atomic_ref(slot.kind).store(detail::stamped_kind(stamp, e.kind));
  }
  void put(entry e) {
    put_at(next, e, next);
    ++next;
  }
  void ring() {
    const char one = 1;
    (void)::send(bell.get(), &one, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
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
    for (const auto& f :
         std::filesystem::directory_iterator(*points_directory(::geteuid(), dir_.path()))) {
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

// An entry whose sequence is not the next one is not written yet, as far as
// the server can tell: it is not taken, and the next entry in its place is.
TEST_F(ChannelAbuse, AnEntryOutOfSequenceIsNotTaken) {
  auto bad = raw_client::connect(path_);
  for (std::uint32_t stamp : {5u, 0u - 1, detail::ring_entries}) {
    bad.put_at(0, {static_cast<std::uint32_t>(entry_kind::request), 0, 1, 0, 8}, stamp);
    bad.ring();
  }
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(svc_->stats().requests, 0u);
  EXPECT_EQ(svc_->stats().clients, 2u);
  EXPECT_EQ(svc_->stats().protocol_violations, 0u);
  // In sequence: taken from position 0, so this broken one ends the client.
  bad.put({static_cast<std::uint32_t>(entry_kind::dispose), 0, 1, 0, 0});
  bad.ring();
  expect_dropped(bad);
}

// The doorbells are a socket pair, and the client's end is its own: making it
// blocking, never reading it and flooding ours stalls no reply of the server.
// (As eventfds, passed copies shared one open file description: a client that
// cleared O_NONBLOCK and filled the counter made the server's next ring block
// for ever, in reply() or on a loop thread.)
TEST_F(ChannelAbuse, AClientThatBlocksItsBellAndNeverReadsItStallsNoReply) {
  {
    auto bad = raw_client::connect(path_);
    ASSERT_EQ(::fcntl(bad.bell.get(), F_SETFL, 0), 0);
    for (int i = 0; i < 64; ++i) {
      const char x = 'x';
      (void)::send(bad.bell.get(), &x, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
    }
    bad.shared->client_listening.store(1);  // "ring me for every reply"
    constexpr std::uint64_t calls = 40;     // far more than its end's queue holds
    for (std::uint64_t id = 1; id <= calls; ++id)
      bad.put({static_cast<std::uint32_t>(entry_kind::request), 0, id, (id - 1) * 64, 8});
    bad.ring();
    for (int i = 0; i < 5000 && svc_->stats().replies < calls; ++i)
      std::this_thread::sleep_for(1ms);
    EXPECT_GE(svc_->stats().replies, calls);
    auto r = good_->call("unharmed", in(5s));
    ASSERT_TRUE(r) << r.error().message();
    EXPECT_EQ(r->copy(), "unharmed");
  }  // gone: the server's teardown rings nobody and waits for nothing
  for (int i = 0; i < 5000 && svc_->stats().clients != 1; ++i) std::this_thread::sleep_for(1ms);
  EXPECT_EQ(svc_->stats().clients, 1u);
}

// Entries that make no event (aborts of nothing) written without a pause keep
// the receiver's loop busy: its deadline still ends it.
TEST_F(ChannelAbuse, AStreamOfEntriesThatMakeNoEventEndsNoDeadlineLater) {
  echo_.reset();  // this test receives itself
  auto bad = raw_client::connect(path_);
  while (svc_->receive(in(50ms))) {
  }  // the connected events
  std::atomic<bool> writing{true};
  std::thread writer([&] {
    const auto until = std::chrono::steady_clock::now() + 10s;  // bounded, whatever happens
    for (std::uint32_t i = 0; writing.load() && std::chrono::steady_clock::now() < until; ++i) {
      bad.put({static_cast<std::uint32_t>(entry_kind::abort), 0, 999, 0, 0});
      if (i % 64 == 0) bad.ring();
    }
  });
  const auto start = std::chrono::steady_clock::now();
  auto r = svc_->receive(in(200ms));
  const auto took = std::chrono::steady_clock::now() - start;
  writing = false;
  writer.join();
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), make_error_code(uipc::errc::timed_out));
  EXPECT_LT(took, 2s);
}

// Clients that come and go while the application receives nothing pin no
// descriptors: a client that never sent a message is not reported at all.
TEST_F(ChannelAbuse, ClientsComingAndGoingUnreceivedPinNoDescriptors) {
  echo_.reset();  // nobody receives
  while (svc_->receive(in(50ms))) {
  }
  const std::size_t before = uipc::test::open_fd_count();
  for (int i = 0; i < 200; ++i) {
    auto c = connect("abused");
    ASSERT_TRUE(c) << c.error().message();
  }
  for (int i = 0; i < 2000 && svc_->stats().clients != 1; ++i) std::this_thread::sleep_for(1ms);
  EXPECT_EQ(svc_->stats().clients, 1u);
  EXPECT_LE(uipc::test::open_fd_count(), before + 8);
  auto nothing = svc_->receive(in(50ms));
  ASSERT_FALSE(nothing) << "an unseen client was reported";
  EXPECT_EQ(nothing.error(), make_error_code(uipc::errc::timed_out));
}

// Ended clients whose events wait unreceived count against max_clients: past
// it, a new client is refused at once; once the events are received, served.
TEST_F(ChannelAbuse, EndedClientsWithUnreceivedEventsCountAgainstMaxClients) {
  echo_.reset();
  good_.reset();
  auto o = options();
  o.max_clients = 3;
  auto small = serve("small", o);
  ASSERT_TRUE(small);
  {
    std::vector<std::unique_ptr<client>> clients;
    for (int i = 0; i < 3; ++i) {
      auto c = connect("small");
      ASSERT_TRUE(c) << c.error().message();
      ASSERT_TRUE((*c)->send(bytes("unanswered")));
      clients.push_back(std::move(*c));
    }
    // Received and never answered: each client's end queues a dispose event.
    int requests = 0;
    for (int i = 0; i < 20 && requests < 3; ++i) {
      auto e = (*small)->receive(in(1s));
      ASSERT_TRUE(e) << e.error().message();
      if (e->kind == event_kind::request) ++requests;
    }
    ASSERT_EQ(requests, 3);
  }
  for (int i = 0; i < 2000 && (*small)->stats().clients != 0; ++i) std::this_thread::sleep_for(1ms);
  auto refused = connect("small");
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.error(), make_error_code(errc::no_buffers));
  int disconnected = 0;
  while (auto e = (*small)->receive(in(200ms))) {
    if (e->kind == event_kind::disconnected) ++disconnected;
  }
  EXPECT_EQ(disconnected, 3);
  auto served = connect("small");
  ASSERT_TRUE(served) << served.error().message();
}

// A client that stopped reading its socket (its replies pile up unread) is
// still dropped when it breaks the channel: the close does not wait for the
// error notice to go out.
TEST_F(ChannelAbuse, AClientThatStopsReadingIsDroppedForAViolationAllTheSame) {
  auto bad = raw_client::connect(path_);
  const std::string hello = proto::caps::Hello().SerializeAsString();
  for (std::uint64_t i = 1; i <= 50'000; ++i) {  // far more replies than its socket holds
    frame f;
    f.kind = frame_kind::request;
    f.type = proto::caps::HELLO;
    f.payload = hello;
    f.correlation_id = i;
    if (bad.ctrl.send(std::move(f), in(1s))) break;
  }
  bad.put({static_cast<std::uint32_t>(entry_kind::dispose), 0, 42, 0, 0});  // never answered
  bad.ring();
  for (int i = 0; i < 5000 && svc_->stats().clients != 1; ++i) std::this_thread::sleep_for(1ms);
  EXPECT_EQ(svc_->stats().clients, 1u);
  EXPECT_GE(svc_->stats().protocol_violations, 1u);
  auto r = good_->call("unharmed", in(5s));
  ASSERT_TRUE(r) << r.error().message();
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
  echo_ = std::make_unique<responder>(
      *svc_, [](service&, const event&) {});  // nobody answers: both in flight
  bad.put({static_cast<std::uint32_t>(entry_kind::request), 0, 7, 0, 8});
  bad.put({static_cast<std::uint32_t>(entry_kind::request), 0, 7, 64, 8});
  bad.ring();
  EXPECT_EQ(bad.hung_up_because(), make_error_code(errc::protocol_violation));
}

TEST_F(ChannelAbuse, MoreInFlightThanTheLimit) {
  auto bad = raw_client::connect(path_);
  echo_ = std::make_unique<responder>(*svc_, [](service&, const event&) {});
  for (std::uint64_t id = 1; id <= 129; ++id)
    bad.put({static_cast<std::uint32_t>(entry_kind::request), 0, id, 0, 8});
  bad.ring();
  EXPECT_EQ(bad.hung_up_because(), make_error_code(errc::protocol_violation));
}

TEST_F(ChannelAbuse, ADisposeOfAMessageNeverAnswered) {
  auto bad = raw_client::connect(path_);
  bad.put({static_cast<std::uint32_t>(entry_kind::dispose), 0, 42, 0, 0});
  bad.ring();
  expect_dropped(bad);
}

// A reply that finds the client's reply arena full reads the client's ring
// for disposals that free blocks: what it finds there is judged as any read
// is, and a broken entry ends the client (it was consumed and forgotten).
TEST_F(ChannelAbuse, ABrokenEntryFoundWhileAReplyWaitsForSpaceEndsTheClient) {
  auto bad = raw_client::connect(path_);
  constexpr std::size_t whole_arena = std::size_t{4} << 20;  // service_options' default
  std::promise<void> asked;
  std::promise<void> published;
  auto published_done = published.get_future();
  echo_ = std::make_unique<responder>(*svc_, [&](service& svc, const event& e) {
    if (e.id == 1) {  // fills the reply arena: the client never disposes
      (void)svc.reply_in_place(e.client, e.id, whole_arena, [](std::span<std::byte> out) {
        std::memset(out.data(), 'r', out.size());
      });
      return;
    }
    asked.set_value();
    (void)published_done.wait_for(5s);
    (void)svc.reply(e.client, e.id, bytes("no room"));
  });
  auto asked_done = asked.get_future();
  bad.put({static_cast<std::uint32_t>(entry_kind::request), 0, 1, 0, whole_arena});
  bad.put({static_cast<std::uint32_t>(entry_kind::request), 0, 2, 0, 8});
  bad.ring();
  EXPECT_EQ(asked_done.wait_for(5s), std::future_status::ready);
  bad.put({static_cast<std::uint32_t>(entry_kind::dispose), 0, 42, 0, 0});  // never answered
  published.set_value();
  EXPECT_EQ(bad.hung_up_because(), make_error_code(errc::protocol_violation));
  EXPECT_GE(svc_->stats().protocol_violations, 1u);
  echo_.reset();  // its answer refers to this test's promises
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
    // Everything but the words that say which entry comes next: scribbled on,
    // those would only stall this client's own ring, and the test wants the
    // server to read garbage.
    const auto* entries = reinterpret_cast<unsigned char*>(bad.shared->to_server.entries);
    const auto sequence_word = [&](std::size_t at) {
      const auto* p = base + at;
      return p >= entries && p < entries + sizeof bad.shared->to_server.entries &&
             static_cast<std::size_t>(p - entries) % sizeof(entry) < sizeof(entry::kind);
    };
    // Until told to stop, and at least until its entries are all out: on a
    // loaded machine this thread may first run after the good client's calls
    // are done, and a scribbler that never wrote leaves nothing to drop.
    while (!stop.load() || bad.next < detail::ring_entries / 2) {
      for (int i = 0; i < 256; ++i) {
        const std::size_t at = random() % span;
        if (!sequence_word(at)) base[at] = static_cast<unsigned char>(random());
      }
      // And entries of random content in sequence, as a client that knows the
      // format would write them: these the server takes. Fewer than a ring's
      // worth: a writer that laps the reader only stalls its own ring.
      if (bad.next < detail::ring_entries / 2)
        bad.put({static_cast<std::uint32_t>(random()), static_cast<std::uint32_t>(random()),
                 random(), random(), random()});
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

// ---- a hostile server: the client checks what the server writes, too -------------

namespace uipc::caps::test {
namespace {

// Serves one client by hand on a socket in our points directory, with a
// channel whose to_client ring it then writes as it likes.
class hostile_server {
 public:
  hostile_server(const std::string& base, const std::string& name) {
    auto dir = detail::own_points_directory(base);
    EXPECT_TRUE(dir);
    path_ = *dir + "/" + name + "@1.0.sock";
    listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strncpy(addr.sun_path, path_.c_str(), sizeof addr.sun_path - 1);
    EXPECT_EQ(::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    EXPECT_EQ(::listen(listen_fd_, 4), 0);
  }
  ~hostile_server() {
    ::close(listen_fd_);
    ::unlink(path_.c_str());
  }

  // Accepts the client and sends it a proper welcome.
  void welcome() {
    conn_.emplace(*blocking_connection::adopt(
        unique_fd(::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC))));
    const auto layout = detail::channel_layout::of(64 << 10, 64 << 10);
    auto seg = shm_segment::create_anonymous(layout.total,
                                             {detail::channel_magic, detail::channel_version});
    ASSERT_TRUE(seg);
    segment_.emplace(std::move(*seg));
    shared_ = new (segment_->data()) detail::channel_shared{};
    proto::caps::Welcome w;
    w.set_version(detail::channel_version);
    w.set_generation(1);
    w.set_gid(::getegid());
    w.set_max_in_flight(8);
    w.set_request_arena(layout.request_arena_size);
    w.set_reply_arena(layout.reply_arena_size);
    frame f;
    f.kind = frame_kind::notice;
    f.type = proto::caps::WELCOME;
    f.payload = w.SerializeAsString();
    f.fds.emplace_back(::fcntl(segment_->fd(), F_DUPFD_CLOEXEC, 0));
    if (eventfd_bell_) {
      f.fds.emplace_back(::eventfd(0, EFD_CLOEXEC));  // what the first protocol passed
    } else {
      auto bells = detail::make_bell_pair();
      ASSERT_TRUE(bells);
      bell_ = std::move(bells->ours);
      f.fds.push_back(std::move(bells->theirs));
    }
    ASSERT_FALSE(conn_->send(std::move(f), in(5s)));
  }

  // Waits for the client's first request; returns its id.
  std::uint64_t first_request() {
    detail::entry& first = shared_->to_server.entries[0];
    for (int i = 0; i < 5000 && std::atomic_ref(first.kind).load() == 0; ++i)
      std::this_thread::sleep_for(1ms);
    detail::entry e;
    std::memcpy(&e, &first, sizeof e);
    return e.id;
  }

  // Writes `e` as the first entry to the client, with the sequence of `stamp`.
  void answer(detail::entry e, std::uint32_t stamp = 0) {
    detail::entry& slot = shared_->to_client.entries[0];
    std::memcpy(reinterpret_cast<char*>(&slot) + 4, reinterpret_cast<const char*>(&e) + 4,
                sizeof e - 4);
    std::atomic_ref(slot.kind).store(detail::stamped_kind(stamp, e.kind));
    wake();
  }
  void wake() {
    shared_->reply_seq.fetch_add(1);
    futex::wake(shared_->reply_seq, INT_MAX);
  }
  detail::channel_shared* shared() { return shared_; }
  /// Passes an eventfd as the doorbell, which a client must refuse: an open
  /// file description it would share with us.
  void pass_an_eventfd_bell() { eventfd_bell_ = true; }

 private:
  std::string path_;
  int listen_fd_ = -1;
  std::optional<blocking_connection> conn_;
  std::optional<shm_segment> segment_;
  detail::channel_shared* shared_ = nullptr;
  bool eventfd_bell_ = false;
  unique_fd bell_;
};

class HostileServer : public caps_test {
 protected:
  // Connects a client to `bad` and makes a call that `act` answers.
  error_code call_answered_by(const std::function<void(hostile_server&, std::uint64_t)>& act) {
    hostile_server bad(dir_.path(), "hostile");
    auto connecting = std::async(std::launch::async, [&] { return connect("hostile"); });
    bad.welcome();
    auto c = connecting.get();
    EXPECT_TRUE(c) << c.error().message();
    if (!c) return c.error();
    auto call = std::async(std::launch::async, [&] { return (*c)->call("hello?", in(5s)); });
    act(bad, bad.first_request());
    auto r = call.get();
    EXPECT_FALSE(r);
    if (r) return {};
    // Once the server broke the protocol the client stays closed.
    EXPECT_EQ((*c)->call("again", in(1s)).error(), r.error());
    return r.error();
  }
};

// A doorbell the client would share an open file description of (an eventfd:
// the server could make the client's ring block) is refused at connect.
TEST_F(HostileServer, ADoorbellThatIsNotADatagramSocketIsRefused) {
  hostile_server bad(dir_.path(), "hostile");
  bad.pass_an_eventfd_bell();
  auto connecting = std::async(std::launch::async, [&] { return connect("hostile"); });
  bad.welcome();
  auto c = connecting.get();
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error(), make_error_code(errc::protocol_violation));
}

TEST_F(HostileServer, AReplyOutsideTheArena) {
  const auto ec = call_answered_by([](hostile_server& s, std::uint64_t id) {
    s.answer({static_cast<std::uint32_t>(entry_kind::reply), 0, id, 60 << 10, 8 << 10});
  });
  EXPECT_EQ(ec, make_error_code(errc::protocol_violation));
}

TEST_F(HostileServer, AReplyToAnIdNeverSent) {
  const auto ec = call_answered_by([](hostile_server& s, std::uint64_t id) {
    s.answer({static_cast<std::uint32_t>(entry_kind::reply), 0, id + 77, 0, 8});
  });
  EXPECT_EQ(ec, make_error_code(errc::protocol_violation));
}

// A reply whose sequence is not the next one is not taken: the call ends at
// its deadline, as with a server that never answers.
TEST_F(HostileServer, AReplyOutOfSequenceIsNotTaken) {
  hostile_server bad(dir_.path(), "hostile");
  auto connecting = std::async(std::launch::async, [&] { return connect("hostile"); });
  bad.welcome();
  auto c = connecting.get();
  ASSERT_TRUE(c) << c.error().message();
  auto call = std::async(std::launch::async, [&] { return (*c)->call("hello?", in(300ms)); });
  bad.answer({static_cast<std::uint32_t>(entry_kind::reply), 0, bad.first_request(), 0, 8}, 1);
  auto r = call.get();
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error(), make_error_code(errc::timed_out));
}

TEST_F(HostileServer, AFailureWithAnUnknownCode) {
  const auto ec = call_answered_by([](hostile_server& s, std::uint64_t id) {
    s.answer({static_cast<std::uint32_t>(entry_kind::failed), 9999, id, 0, 0});
  });
  EXPECT_EQ(ec, make_error_code(errc::protocol_violation));
}

// The writing end reads the peer's head only when the head it read last leaves
// too little room, and checks it then: ahead of the tail, more than a ring
// behind it, or behind the head read before are all broken protocol.
TEST(RingWriter, ReadsThePeersHeadOnlyWhenShortAndChecksIt) {
  using detail::ring_entries;
  using detail::ring_shared;
  using detail::ring_writer;
  auto ring = std::make_unique<ring_shared>();
  ring_writer w(ring.get());
  ring->head.store(12345);  // garbage, but not read while there is room
  EXPECT_EQ(w.free_entries(), ring_entries);
  for (std::uint32_t i = 0; i < ring_entries; ++i) w.put(entry{});
  EXPECT_EQ(w.free_entries(), std::nullopt);  // full by the head read last: read now, and refused

  ring->head.store(5);
  EXPECT_EQ(w.free_entries(), 5u);
  EXPECT_EQ(w.free_entries(6), 5u);  // read again: still 5
  ring->head.store(3);               // went back
  EXPECT_EQ(w.free_entries(6), std::nullopt);
  ring->head.store(ring_entries + 1);  // beyond our tail
  EXPECT_EQ(w.free_entries(6), std::nullopt);
  ring->head.store(ring_entries);  // everything read
  EXPECT_EQ(w.free_entries(ring_entries), ring_entries);
}

}  // namespace
}  // namespace uipc::caps::test
