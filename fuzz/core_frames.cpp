// Fuzz target: the framed transport's receive side, as another process reaches
// it. The input is what a peer writes to a uipc::connection's socket: byte
// chunks, each sent with sendmsg and optionally with descriptors attached
// (SCM_RIGHTS), so the frame reader, the envelope decoder and its descriptor
// accounting, and the connection's close paths all run as they do in a server.
//
// Input: [options] then chunks of [ctl][length u16 le][bytes].
//   options bit 0: peer_sends_fds = false; bit 1: max_frame_size 256;
//           bits 2-3: max_fds_per_frame 0, 1, 4 or 16.
//   ctl bits 0-4: descriptors attached to the chunk; bit 7: run the loop
//           before the next chunk (otherwise chunks pile up in the socket).
//
// Checks: a frame never carries more descriptors than allowed, each open;
// requests get an echo reply (their descriptors go back with it); after the
// peer's EOF every operation completes and the connection is closed; no
// descriptor is left open when it is gone. For streams without descriptors,
// the harness also reads the bytes itself (the generated Envelope class, none
// of core's code): the connection must hand over exactly those frames, however
// the bytes were cut into sends, and close for the reason the stream gives.
#include <sys/socket.h>

#include <array>
#include <boost/asio/io_context.hpp>
#include <chrono>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "fuzz_support.hpp"
#include "uipc/core/framed.hpp"
#include "uipc/proto/envelope.pb.h"

namespace {

using namespace uipc;

struct fixture {
  boost::asio::io_context ctx;
  int spare = ::open("/dev/null", O_RDONLY | O_CLOEXEC);  // what chunks carry, dup'ed
  std::unique_ptr<fuzz::fd_census> census;
};

fixture& the_fixture() {
  static fixture f;
  return f;
}

// Reads and discards what the connection wrote to the peer, closing any
// descriptors that came with it.
void drain(int peer) {
  std::array<char, 4096> buf;
  while (fuzz::receive_closing_fds(peer, buf.data(), buf.size()) > 0) {
  }
}

// Sends one chunk with `fds` duplicates of the spare descriptor; the kernel
// copies them, so ours are closed at once.
void send_chunk(fixture& fx, int peer, std::span<const std::uint8_t> bytes, std::size_t fds,
                std::string& sent) {
  std::array<int, 31> dups{};
  for (std::size_t i = 0; i < fds; ++i) dups[i] = ::fcntl(fx.spare, F_DUPFD_CLOEXEC, 0);
  std::array<char, CMSG_SPACE(sizeof(int) * 31)> control{};
  std::uint8_t empty = 0;
  iovec iov{const_cast<std::uint8_t*>(bytes.empty() ? &empty : bytes.data()),
            bytes.size()};  // NOLINT: sendmsg reads
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (fds > 0) {
    msg.msg_control = control.data();
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds);
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds);
    std::memcpy(CMSG_DATA(c), dups.data(), sizeof(int) * fds);
  }
  // Descriptors need at least one byte to travel with; an empty chunk without
  // them is nothing to send.
  if (!bytes.empty() || fds > 0) {
    if (bytes.empty()) iov.iov_len = 0;
    for (int tries = 0; tries < 1000; ++tries) {
      const ssize_t n = ::sendmsg(peer, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (n >= 0) {
        sent.append(reinterpret_cast<const char*>(bytes.data()),
                    static_cast<std::size_t>(n));          // NOLINT
        if (static_cast<std::size_t>(n) < bytes.size()) {  // the rest, without descriptors
          send_chunk(fx, peer, bytes.subspan(static_cast<std::size_t>(n)), 0, sent);
        }
        break;
      }
      if (errno != EAGAIN) break;  // the connection closed its end: the rest goes nowhere
      fx.ctx.poll();
      drain(peer);
    }
  }
  for (std::size_t i = 0; i < fds; ++i) ::close(dups[i]);
}

// What the byte stream says, read by the harness on its own with the
// generated Envelope class: the requests and notices a connection must hand
// over, and why it must close once the stream ends. Only for streams without
// descriptors (which chunks carry is the kernel's business, not the stream's).
struct expectation {
  std::vector<frame> frames;         // requests and notices, in order
  std::optional<error_code> reason;  // nothing: decided by the peer (an error notice)
};

expectation expected(const std::string& stream, const connection_options& options) {
  expectation out;
  std::size_t at = 0;
  for (;;) {
    const std::size_t have = stream.size() - at;
    if (have == 0) {
      out.reason = make_error_code(errc::peer_closed);
      return out;
    }
    if (have < 4) {
      out.reason = make_error_code(errc::short_frame);
      return out;
    }
    std::uint32_t length;
    std::memcpy(&length, stream.data() + at, 4);  // little-endian: this is x86-64
    if (length > options.max_frame_size) {
      out.reason = make_error_code(errc::frame_too_large);
      return out;
    }
    if (length == 0) {
      out.reason = make_error_code(errc::bad_frame);
      return out;
    }
    if (have < 4 + std::size_t{length}) {
      out.reason = make_error_code(errc::short_frame);
      return out;
    }
    proto::Envelope env;
    const std::size_t max_fds = options.peer_sends_fds ? options.max_fds_per_frame : 0;
    if (!env.ParseFromArray(stream.data() + at + 4, static_cast<int>(length)) ||
        !proto::Envelope::Kind_IsValid(env.kind())) {
      out.reason = make_error_code(errc::bad_frame);
      return out;
    }
    if (env.fd_count() > max_fds) {
      out.reason = make_error_code(errc::too_many_fds);
      return out;
    }
    if (env.fd_count() > 0 ||
        (env.kind() != proto::Envelope::NOTICE && env.correlation_id() == 0)) {
      out.reason = make_error_code(errc::bad_frame);
      return out;
    }
    at += 4 + length;
    if (env.kind() == proto::Envelope::REPLY) continue;            // to the call, or dropped
    if (env.has_error() && env.correlation_id() == 0) return out;  // the peer says goodbye
    frame f;
    f.kind = env.kind() == proto::Envelope::REQUEST ? frame_kind::request : frame_kind::notice;
    f.correlation_id = env.correlation_id();
    f.type = env.type();
    f.payload = env.payload();
    out.frames.push_back(std::move(f));
  }
}

}  // namespace

namespace {

void run_one(const std::uint8_t* data, std::size_t size) {
  fixture& fx = the_fixture();
  fuzz::input in(data, size);

  const std::uint8_t flags = in.byte();
  connection_options options;
  options.peer_sends_fds = (flags & 1) == 0;
  if ((flags & 2) != 0) options.max_frame_size = 256;
  constexpr std::array<std::size_t, 4> fd_limits{0, 1, 4, 16};
  options.max_fds_per_frame = fd_limits[(flags >> 2) & 3];

  int sv[2];
  UIPC_FUZZ_CHECK(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
  const int peer = sv[1];
  auto adopted = connection::adopt(fx.ctx, unique_fd(sv[0]), options);
  UIPC_FUZZ_CHECK(adopted.has_value());
  connection::pointer conn = *adopted;

  // One call in flight, so that a reply with correlation id 1 has somewhere to go.
  bool call_done = false;
  frame request;
  request.type = 7;
  conn->async_call(std::move(request), [&](error_code, frame reply) {
    UIPC_FUZZ_CHECK(reply.fds.size() <= options.max_fds_per_frame);
    call_done = true;
  });
  // Receives until the connection closes; answers requests with their own payload and descriptors.
  bool receive_done = false;
  std::vector<frame> received;
  std::function<void(error_code, frame)> on_frame = [&](error_code ec, frame f) {
    if (ec) {
      receive_done = true;
      return;
    }
    frame copy;
    copy.kind = f.kind;
    copy.correlation_id = f.correlation_id;
    copy.type = f.type;
    copy.payload = f.payload;
    received.push_back(std::move(copy));
    UIPC_FUZZ_CHECK(f.kind != frame_kind::reply);
    UIPC_FUZZ_CHECK(f.fds.size() <= options.max_fds_per_frame);
    UIPC_FUZZ_CHECK(options.peer_sends_fds || f.fds.empty());
    for (const auto& fd : f.fds) UIPC_FUZZ_CHECK(::fcntl(fd.get(), F_GETFD) != -1);
    if (f.kind == frame_kind::request) {
      frame reply = make_reply(f, f.type, f.payload);
      reply.fds = std::move(f.fds);
      (void)conn->send(std::move(reply));
    }
    conn->async_receive(on_frame);
  };
  conn->async_receive(on_frame);

  std::string stream;  // every byte the connection was sent
  bool any_fds = false;
  while (!in.empty()) {
    const std::uint8_t ctl = in.byte();
    const std::size_t length = in.u16();
    any_fds = any_fds || (ctl & 0x1f) != 0;
    send_chunk(fx, peer, in.bytes(length), ctl & 0x1f, stream);
    if ((ctl & 0x80) != 0) {
      fx.ctx.poll();
      drain(peer);
    }
  }
  ::shutdown(peer, SHUT_WR);

  // The peer's EOF ends the connection; everything pending must complete.
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (!(call_done && receive_done)) {
    UIPC_FUZZ_CHECK(std::chrono::steady_clock::now() < until);
    if (fx.ctx.stopped()) fx.ctx.restart();
    fx.ctx.poll();
    drain(peer);
  }
  UIPC_FUZZ_CHECK(!conn->is_open());
  UIPC_FUZZ_CHECK(conn->close_reason());
  if (!any_fds) {
    // However the bytes were cut into sends, the frames come out whole, in
    // order, up to the first bad one, and the close says why.
    const expectation want = expected(stream, options);
    UIPC_FUZZ_CHECK(received.size() == want.frames.size());
    for (std::size_t i = 0; i < received.size(); ++i) {
      UIPC_FUZZ_CHECK(received[i].kind == want.frames[i].kind);
      UIPC_FUZZ_CHECK(received[i].correlation_id == want.frames[i].correlation_id);
      UIPC_FUZZ_CHECK(received[i].type == want.frames[i].type);
      UIPC_FUZZ_CHECK(received[i].payload == want.frames[i].payload);
    }
    if (want.reason) {
      if (conn->close_reason() != *want.reason) {
        std::fprintf(stderr, "closed with '%s', the stream says '%s'\n",
                     conn->close_reason().message().c_str(), want.reason->message().c_str());
      }
      UIPC_FUZZ_CHECK(conn->close_reason() == *want.reason);
    }
  }
  on_frame = nullptr;
  conn.reset();
  if (fx.ctx.stopped()) fx.ctx.restart();
  fx.ctx.poll();
  drain(peer);
  ::close(peer);
  fuzz::check_no_descriptor_changed(fx.census);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return uipc::fuzz::run_counted(the_fixture(), run_one, data, size);
}
