// Frames that handlers queue while a read hands over a batch of frames are
// written together (several to a sendmsg): whatever the batching, every frame
// arrives whole, in order, with its own descriptors, and nothing queued before
// a close or a protocol error is lost.
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <boost/asio/io_context.hpp>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "raw_peer.hpp"
#include "test_support.hpp"
#include "uipc/core/framed.hpp"
#include "uipc/proto/envelope.pb.h"

namespace uipc {
namespace {

using test::run_until;

// Every frame of the test is numbered, per side, in the order it is queued:
// the number travels as its type and decides its payload and descriptors, so
// the receiver can tell a frame cut short, merged, reordered or given another
// frame's descriptors.
// The first 200 frames of a side are small, so that many come in one read;
// the rest range up to larger than the socket buffer.
std::size_t payload_size(std::uint32_t seq) {
  static constexpr std::size_t sizes[] = {0,      1,  100,   4090, 70000, 3,
                                          300000, 17, 65536, 5,    12,    2000};
  return seq < 200 ? seq % 50 : sizes[seq % std::size(sizes)];
}

std::size_t fd_count(std::uint32_t seq) {
  if (seq % 9 == 2) return 3;
  return seq % 4 == 1 ? 1 : 0;
}

std::string payload_of(char side, std::uint32_t seq) {
  std::string p(payload_size(seq), '\0');
  for (std::size_t i = 0; i < p.size(); ++i) p[i] = static_cast<char>(side + seq * 31 + i * 7);
  return p;
}

std::string tag_of(char side, std::uint32_t seq, std::size_t j) {
  return std::string(1, side) + ":" + std::to_string(seq) + ":" + std::to_string(j);
}

// A pipe's read end with `tag` waiting in it.
unique_fd tagged_pipe(const std::string& tag) {
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0) std::abort();
  if (::write(p[1], tag.data(), tag.size()) != static_cast<ssize_t>(tag.size())) std::abort();
  ::close(p[1]);
  return unique_fd(p[0]);
}

std::string read_tag(const unique_fd& fd) {
  std::string text(64, '\0');
  const ssize_t n = ::read(fd.get(), text.data(), text.size());
  text.resize(n > 0 ? static_cast<std::size_t>(n) : 0);
  return text;
}

// Frame number `seq` of `side`, of `kind`.
frame numbered(char side, std::uint32_t seq, frame_kind kind) {
  frame f;
  f.kind = kind;
  f.type = seq;
  f.payload = payload_of(side, seq);
  for (std::size_t j = 0; j < fd_count(seq); ++j)
    f.fds.push_back(tagged_pipe(tag_of(side, seq, j)));
  return f;
}

// Whether `f` is frame number f.type of `side`, whole, with its own descriptors.
::testing::AssertionResult intact(char side, const frame& f) {
  if (f.payload != payload_of(side, f.type)) {
    return ::testing::AssertionFailure()
           << side << " frame " << f.type << ": payload of " << f.payload.size()
           << " bytes, not the " << payload_size(f.type) << " sent";
  }
  if (f.fds.size() != fd_count(f.type)) {
    return ::testing::AssertionFailure() << side << " frame " << f.type << ": " << f.fds.size()
                                         << " descriptors, not " << fd_count(f.type);
  }
  for (std::size_t j = 0; j < f.fds.size(); ++j) {
    const std::string tag = read_tag(f.fds[j]);
    if (tag != tag_of(side, f.type, j)) {
      return ::testing::AssertionFailure()
             << side << " frame " << f.type << " descriptor " << j << " carries '" << tag << "'";
    }
  }
  return ::testing::AssertionSuccess();
}

class FramedBatchTest : public test::loop_test {};

// Both sides answer from handlers that the read runs inline, many frames at a
// time: the server answers each of a burst of requests with notices and a
// reply, some through async_send, some with descriptors; the client answers
// some replies with notices of its own. Far more frames per read than one
// sendmsg gathers, frames larger than the socket buffer, descriptors in the
// middle of batches.
TEST_F(FramedBatchTest, FramesQueuedByHandlersInABatchArriveWholeInOrderWithTheirDescriptors) {
  auto pair = connection::pair(ctx_);
  ASSERT_TRUE(pair);
  auto [client, server] = *pair;

  struct state {
    std::uint32_t client_next = 0;  // numbers of the frames the client queues
    std::uint32_t server_next = 0;
    std::uint32_t server_expects = 0;  // the server takes the client's frames in order
    std::vector<std::uint32_t>
        replies_seen;  // numbers of the server's frames, as the client got them
    std::vector<std::uint32_t> notices_seen;
    std::size_t sends_completed = 0;
    std::size_t async_sends = 0;
    bool failed = false;
  };
  auto st = std::make_shared<state>();
  constexpr std::uint32_t requests = 150;

  // Server: requests and the client's notices come through its inbox, in
  // stream order. Every request is answered with (seq % 3) notices, the
  // reply, and one more notice every fourth time.
  std::function<void()> serve = [server = server, st, &serve] {
    server->async_receive([server, st, &serve](error_code ec, frame f) {
      if (ec) return;
      if (f.type != st->server_expects++ || !intact('c', f)) {
        ADD_FAILURE() << "server got client frame " << f.type << ", expected "
                      << st->server_expects - 1;
        st->failed = true;
      }
      if (f.kind == frame_kind::request) {
        auto send = [&](frame out) {
          if (out.type % 2 == 0) {
            ++st->async_sends;
            server->async_send(std::move(out), [st](error_code e) {
              EXPECT_FALSE(e);
              ++st->sends_completed;
            });
          } else {
            EXPECT_FALSE(server->send(std::move(out)));
          }
        };
        for (std::uint32_t i = 0; i < f.type % 3; ++i)
          send(numbered('s', st->server_next++, frame_kind::notice));
        frame reply = numbered('s', st->server_next++, frame_kind::reply);
        reply.correlation_id = f.correlation_id;
        send(std::move(reply));
        if (f.type % 4 == 0) send(numbered('s', st->server_next++, frame_kind::notice));
      }
      serve();
    });
  };
  serve();

  // Client: its notices come through its inbox in order.
  std::function<void()> watch = [client = client, st, &watch] {
    client->async_receive([st, &watch](error_code ec, frame f) {
      if (ec) return;
      EXPECT_TRUE(intact('s', f));
      st->notices_seen.push_back(f.type);
      watch();
    });
  };
  watch();

  // The burst of requests, queued before the loop runs: the server reads
  // many at once. A reply's handler runs inside the client's read and sends
  // a notice back every other time.
  for (std::uint32_t r = 0; r < requests; ++r) {
    client->async_call(
        numbered('c', st->client_next++, frame_kind::request),
        [client = client, st](error_code ec, frame reply) {
          EXPECT_FALSE(ec);
          EXPECT_TRUE(intact('s', reply));
          st->replies_seen.push_back(reply.type);
          if (reply.type % 2 == 0) {
            EXPECT_FALSE(client->send(numbered('c', st->client_next++, frame_kind::notice)));
          }
        });
  }

  ASSERT_TRUE(run_until(
      ctx_,
      [&] {
        return st->failed || !client->is_open() || !server->is_open() ||
               (st->replies_seen.size() == requests &&
                st->replies_seen.size() + st->notices_seen.size() == st->server_next &&
                st->server_expects == st->client_next && st->sends_completed == st->async_sends);
      },
      std::chrono::seconds(60)));
  EXPECT_FALSE(st->failed);
  EXPECT_FALSE(client->close_reason()) << client->close_reason().message();
  EXPECT_FALSE(server->close_reason()) << server->close_reason().message();

  // Replies answer their calls and notices wait in the inbox: each kind comes
  // in the order it was sent, and between them every frame is there once.
  std::vector<bool> seen(st->server_next, false);
  for (const auto* kind : {&st->replies_seen, &st->notices_seen}) {
    for (std::size_t i = 0; i < kind->size(); ++i) {
      if (i > 0) {
        EXPECT_LT((*kind)[i - 1], (*kind)[i]) << "reordered";
      }
      ASSERT_LT((*kind)[i], seen.size());
      EXPECT_FALSE(seen[(*kind)[i]]) << "frame " << (*kind)[i] << " twice";
      seen[(*kind)[i]] = true;
    }
  }
  for (std::size_t i = 0; i < seen.size(); ++i) EXPECT_TRUE(seen[i]) << "frame " << i << " missing";
  EXPECT_EQ(client->stats().frames_sent, st->client_next);
  EXPECT_EQ(server->stats().frames_sent, st->server_next);
  EXPECT_EQ(server->stats().queued_send_bytes, 0u);

  client->close();
  server->close();
  ctx_.restart();
  ctx_.run_for(std::chrono::milliseconds(20));
  serve = nullptr;
  watch = nullptr;
}

// A handler that queues frames and then closes the connection: what it
// queued is written before the close, as when each frame was written at once.
TEST_F(FramedBatchTest, FramesQueuedBeforeAHandlerClosesAreStillWritten) {
  auto pair = connection::pair(ctx_);
  ASSERT_TRUE(pair);
  auto [a, b] = *pair;
  b->async_receive([b = b](error_code ec, frame f) {
    ASSERT_FALSE(ec);
    for (std::uint32_t i = 0; i < 4; ++i)
      EXPECT_FALSE(b->send(numbered('s', i, frame_kind::notice)));
    frame reply = numbered('s', 4, frame_kind::reply);
    reply.correlation_id = f.correlation_id;
    EXPECT_FALSE(b->send(std::move(reply)));
    EXPECT_FALSE(b->send(numbered('s', 5, frame_kind::notice)));
    b->close();
  });
  std::vector<frame> got;
  error_code end;
  std::function<void()> next = [&] {
    a->async_receive([&](error_code ec, frame f) {
      if (ec) {
        end = ec;
        return;
      }
      got.push_back(std::move(f));
      next();
    });
  };
  next();
  bool replied = false;
  a->async_call(numbered('c', 0, frame_kind::request), [&](error_code ec, frame reply) {
    EXPECT_FALSE(ec) << ec.message();
    EXPECT_EQ(reply.type, 4u);
    EXPECT_TRUE(intact('s', reply));
    replied = true;
  });
  ASSERT_TRUE(run_until(ctx_, [&] { return replied && end; }));
  EXPECT_EQ(end, make_error_code(errc::peer_closed));
  ASSERT_EQ(got.size(), 5u);
  for (std::uint32_t i = 0; i < 5; ++i) {
    EXPECT_EQ(got[i].type, i < 4 ? i : 5);
    EXPECT_TRUE(intact('s', got[i]));
  }
  a->close();
  next = nullptr;
}

// Replies held back for a batch count against max_queued_send_bytes: reaching
// it pauses the batch, and once they are written the frames still in the
// buffer are handed over, with no new bytes from the peer to prompt it.
TEST_F(FramedBatchTest, ReplyLimitReachedInsideABatchDoesNotStallTheRest) {
  connection_options options;
  options.max_queued_send_bytes = 1000;
  auto pair = connection::pair(ctx_, options);
  ASSERT_TRUE(pair);
  auto [client, server] = *pair;
  std::function<void()> serve = [server = server, &serve] {
    server->async_receive([server, &serve](error_code ec, frame f) {
      if (ec) return;
      EXPECT_FALSE(server->send(make_reply(f, f.type, std::string(600, 'r'))));
      serve();
    });
  };
  serve();
  ctx_.poll();  // both ends wait for bytes: the requests come in one read
  constexpr std::uint32_t requests = 50;
  auto replies = std::make_shared<std::uint32_t>(0);
  for (std::uint32_t i = 0; i < requests; ++i) {
    frame f;
    f.type = i;
    client->async_call(std::move(f), [replies, i](error_code ec, frame reply) {
      if (ec) return;  // closed: the wait below has failed already
      EXPECT_EQ(reply.type, i);
      EXPECT_EQ(reply.payload.size(), 600u);
      ++*replies;
    });
  }
  EXPECT_TRUE(run_until(
      ctx_, [&] { return *replies == requests; }, std::chrono::seconds(5)));
  client->close();
  server->close();
  ctx_.restart();
  ctx_.run_for(std::chrono::milliseconds(20));
  serve = nullptr;
}

// Reads whole frames off a raw socket until EOF.
std::vector<proto::Envelope> read_envelopes(int fd) {
  std::string bytes;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n <= 0) break;
    bytes.append(buf, static_cast<std::size_t>(n));
  }
  std::vector<proto::Envelope> out;
  std::size_t at = 0;
  while (bytes.size() - at >= 4) {
    std::uint32_t length = 0;
    std::memcpy(&length, bytes.data() + at, 4);
    if (bytes.size() - at - 4 < length) break;
    proto::Envelope env;
    if (!env.ParseFromArray(bytes.data() + at + 4, static_cast<int>(length))) break;
    out.push_back(std::move(env));
    at += 4 + length;
  }
  return out;
}

// Good requests and a bad frame in one read: the replies to the good ones go
// out, then the notice saying why the connection is dropped, in that order.
TEST_F(FramedBatchTest, RepliesQueuedBeforeABadFrameGoOutBeforeTheErrorNotice) {
  auto peer = test::make_raw_peer(ctx_);
  peer.conn->async_receive([c = peer.conn](error_code ec, frame f) {
    if (ec) return;
    EXPECT_FALSE(c->send(make_reply(f, 1, "first")));
    c->async_receive([c](error_code ec2, frame f2) {
      if (ec2) return;
      EXPECT_FALSE(c->send(make_reply(f2, 2, "second")));
      EXPECT_FALSE(c->send(make_reply(f2, 3, "third")));
    });
  });
  std::string burst;
  for (std::uint64_t id = 1; id <= 2; ++id) {
    proto::Envelope env;
    env.set_kind(proto::Envelope::REQUEST);
    env.set_correlation_id(id);
    burst += test::envelope_bytes(env);
  }
  burst += test::prefix(0);  // an empty frame: bad_frame
  ctx_.poll();  // the connection waits for bytes: they come in one read, handlers run inline
  ASSERT_EQ(::write(peer.raw.get(), burst.data(), burst.size()),
            static_cast<ssize_t>(burst.size()));
  ASSERT_TRUE(run_until(ctx_, [&] { return !peer.conn->is_open(); }));
  EXPECT_EQ(peer.conn->close_reason(), make_error_code(errc::bad_frame));
  const auto got = read_envelopes(peer.raw.get());
  ASSERT_EQ(got.size(), 4u);
  for (std::uint32_t i = 0; i < 3; ++i) {
    EXPECT_EQ(got[i].kind(), proto::Envelope::REPLY);
    EXPECT_EQ(got[i].type(), i + 1);
  }
  EXPECT_EQ(got[0].payload(), "first");
  EXPECT_EQ(got[2].payload(), "third");
  EXPECT_EQ(got[3].kind(), proto::Envelope::NOTICE);
  EXPECT_TRUE(got[3].has_error());
}

}  // namespace
}  // namespace uipc
