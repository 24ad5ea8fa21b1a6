// Fuzz target: the handle daemon's request handling, from a connected session.
// A real handle_daemon serves on a private socket, on this thread's loop; each
// input is one client session speaking to it over a Unix socket, so the
// server kit (accept, admission, session, request router) and every request
// handler run exactly as they do in uipc-handled.
//
// Input: records of [ctl][length u8][bytes].
//   ctl bit 7 set: the bytes go to the socket raw (no framing of ours), and
//   the session ends there (the stream is out of step).
//   Otherwise ctl bits 0-4 are the frame type and bits 5-6 the kind:
//     0 request, 1 notice, 2 reply, 3 request naming an earlier object: the
//     first byte picks one of the handles (open, close) or scratch blocks
//     (scratch free) the daemon gave this session, and the harness appends
//     its id to the payload (the fuzzer cannot guess slot generations).
// Requests are answered before the next record is sent.
//
// Checks: every request gets its reply (or the session is closed); once the
// session is gone the daemon holds no object, no scratch block and no client,
// and no descriptor is left open.
#include <sys/socket.h>
#include <sys/un.h>

#include <array>
#include <boost/asio/io_context.hpp>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>

#include "fuzz_support.hpp"
#include "uipc/handles/daemon.hpp"
#include "uipc/proto/envelope.pb.h"
#include "uipc/proto/handles.pb.h"

namespace {

using namespace uipc;
namespace pb = uipc::proto::handles;
using clock_type = std::chrono::steady_clock;

struct fixture {
  fixture() {
    std::string pattern = (std::filesystem::temp_directory_path() / "uipc-fuzz-XXXXXX").string();
    UIPC_FUZZ_CHECK(::mkdtemp(pattern.data()) != nullptr);
    dir = pattern;
    handles::daemon_options o;
    o.where.directory = dir;
    o.where.name = "fuzz";
    o.capacity = 32;
    o.scratch_size = 4096;
    auto d = handles::handle_daemon::start(ctx, std::move(o));
    UIPC_FUZZ_CHECK(d.has_value());
    daemon = std::move(*d);
    socket_path = daemon->where().socket_path;
  }
  ~fixture() {
    daemon.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }

  boost::asio::io_context ctx;
  std::string dir;
  std::unique_ptr<handles::handle_daemon> daemon;
  std::string socket_path;
  std::unique_ptr<fuzz::fd_census> census;
};

fixture& the_fixture() {
  static fixture f;
  return f;
}

// The client's side of the session: a raw socket, bytes in, envelopes out.
class session {
 public:
  explicit session(fixture& fx) : fx_(fx) {
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    UIPC_FUZZ_CHECK(fd_ >= 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, fx.socket_path.data(), fx.socket_path.size());
    UIPC_FUZZ_CHECK(::connect(fd_, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) ==
                    0);  // NOLINT
    // Accepted and admitted before the first record: each input is one whole session.
    const auto until = clock_type::now() + std::chrono::seconds(5);
    while (fx.daemon->stats().clients == 0) {
      UIPC_FUZZ_CHECK(clock_type::now() < until);
      turn();
    }
  }
  ~session() { ::close(fd_); }
  session(const session&) = delete;
  session& operator=(const session&) = delete;

  bool closed() const noexcept { return closed_; }
  /// Sends EOF: the daemon reads what was sent, then the end.
  void hang_up() { ::shutdown(fd_, SHUT_WR); }

  void write(const std::string& bytes) {
    std::size_t done = 0;
    const auto until = clock_type::now() + std::chrono::seconds(5);
    while (done < bytes.size() && !closed_) {
      const ssize_t n =
          ::send(fd_, bytes.data() + done, bytes.size() - done, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (n > 0) {
        done += static_cast<std::size_t>(n);
        continue;
      }
      if (n < 0 && errno != EAGAIN) {
        closed_ = true;  // the daemon dropped us
        return;
      }
      UIPC_FUZZ_CHECK(clock_type::now() < until);
      turn();
    }
  }

  void send_frame(proto::Envelope::Kind kind, std::uint64_t correlation_id, std::uint32_t type,
                  std::string payload) {
    proto::Envelope env;
    env.set_kind(kind);
    env.set_correlation_id(correlation_id);
    env.set_type(type);
    env.set_payload(std::move(payload));
    const std::string body = env.SerializeAsString();
    std::string bytes(4, '\0');
    const auto length = static_cast<std::uint32_t>(body.size());
    std::memcpy(bytes.data(), &length, 4);  // little-endian: this is x86-64
    write(bytes + body);
  }

  /// The reply to `correlation_id`, or nothing once the daemon closed the session.
  std::optional<proto::Envelope> await_reply(std::uint64_t correlation_id) {
    const auto until = clock_type::now() + std::chrono::seconds(5);
    for (;;) {
      while (auto env = next_envelope()) {
        if (env->kind() == proto::Envelope::REPLY && env->correlation_id() == correlation_id)
          return env;
        // A notice with an error is the daemon saying why it drops us.
      }
      if (closed_) return std::nullopt;
      UIPC_FUZZ_CHECK(clock_type::now() < until);  // a request the daemon never answers
      turn();
    }
  }

  /// Runs the daemon's loop once and reads what it sent.
  void turn() {
    if (fx_.ctx.stopped()) fx_.ctx.restart();
    fx_.ctx.poll();
    read();
  }

 private:
  void read() {
    for (;;) {
      std::array<char, 4096> buf;  // descriptors: the segment of a hello, not ours to map here
      const ssize_t n = fuzz::receive_closing_fds(fd_, buf.data(), buf.size());
      if (n == 0 || (n < 0 && errno != EAGAIN)) closed_ = true;
      if (n <= 0) return;
      received_.append(buf.data(), static_cast<std::size_t>(n));
    }
  }

  std::optional<proto::Envelope> next_envelope() {
    if (received_.size() < 4) return std::nullopt;
    std::uint32_t length;
    std::memcpy(&length, received_.data(), 4);
    if (received_.size() < 4 + static_cast<std::size_t>(length)) return std::nullopt;
    proto::Envelope env;
    UIPC_FUZZ_CHECK(env.ParseFromArray(received_.data() + 4,
                                       static_cast<int>(length)));  // the daemon's own frames
    received_.erase(0, 4 + length);
    return env;
  }

  fixture& fx_;
  int fd_ = -1;
  bool closed_ = false;
  std::string received_;
};

enum : std::uint32_t {
  type_create = 2,
  type_open = 3,
  type_close = 4,
  type_scratch_store = 5,
  type_scratch_free = 6
};

// The protobuf bytes of field 1 set to `value` (a varint) or to a message.
std::string field1_varint(std::uint64_t value) {
  pb::ScratchFreeRequest r;
  r.set_offset(value);
  return r.SerializeAsString();
}
std::string field1_handle(const pb::HandleId& h) {
  pb::CloseRequest r;
  *r.mutable_handle() = h;
  return r.SerializeAsString();
}

}  // namespace

namespace {

void run_one(const std::uint8_t* data, std::size_t size) {
  fixture& fx = the_fixture();
  fuzz::input in(data, size);
  std::vector<pb::HandleId> handles_held;
  std::vector<std::uint64_t> blocks_held;
  {
    session s(fx);
    std::uint64_t next_id = 1;
    while (!in.empty() && !s.closed()) {
      const std::uint8_t ctl = in.byte();
      const auto bytes = in.bytes(in.byte());
      std::string payload(reinterpret_cast<const char*>(bytes.data()), bytes.size());  // NOLINT
      if ((ctl & 0x80) != 0) {
        // Bytes of no frame of ours: the stream is out of step from here, and
        // the daemon would wait for the rest of whatever they began (up to its
        // partial-frame timeout). The client goes, as a broken one would.
        s.write(payload);
        s.hang_up();
        break;
      }
      const std::uint32_t type = ctl & 0x1f;
      const unsigned kind = (ctl >> 5) & 3;
      if (kind == 1) {
        s.send_frame(proto::Envelope::NOTICE, 0, type, std::move(payload));
        s.turn();
        continue;
      }
      if (kind == 2) {
        s.send_frame(proto::Envelope::REPLY, 77, type, std::move(payload));
        s.turn();
        continue;
      }
      if (kind == 3 && !payload.empty()) {
        const std::uint8_t pick = static_cast<std::uint8_t>(payload[0]);
        payload.erase(0, 1);
        if ((type == type_open || type == type_close) && !handles_held.empty()) {
          payload += field1_handle(handles_held[pick % handles_held.size()]);
        } else if (type == type_scratch_free && !blocks_held.empty()) {
          payload += field1_varint(blocks_held[pick % blocks_held.size()]);
        }
      }
      const std::uint64_t id = next_id++;
      s.send_frame(proto::Envelope::REQUEST, id, type, std::move(payload));
      auto reply = s.await_reply(id);
      if (!reply || reply->has_error()) continue;
      if (type == type_create || type == type_open) {
        pb::HandleReply r;
        UIPC_FUZZ_CHECK(r.ParseFromString(reply->payload()));
        UIPC_FUZZ_CHECK(r.handle().index() != 0);
        handles_held.push_back(r.handle());
      } else if (type == type_scratch_store) {
        pb::ScratchStoreReply r;
        UIPC_FUZZ_CHECK(r.ParseFromString(reply->payload()));
        blocks_held.push_back(r.offset());
      }
    }
  }
  // The session is gone: everything it held must be released.
  const auto until = clock_type::now() + std::chrono::seconds(5);
  for (;;) {
    if (fx.ctx.stopped()) fx.ctx.restart();
    fx.ctx.poll();
    const handles::daemon_stats st = fx.daemon->stats();
    if (st.clients == 0 && st.handles_in_use == 0 && st.scratch_in_use == 0) break;
    if (clock_type::now() >= until) {
      std::fprintf(stderr, "after the session: %u clients, %u handles, %llu scratch bytes in use\n",
                   st.clients, st.handles_in_use,
                   static_cast<unsigned long long>(st.scratch_in_use));
      UIPC_FUZZ_CHECK(!"the daemon kept what a closed session held");
    }
  }
  fuzz::check_no_descriptor_changed(fx.census);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return uipc::fuzz::run_counted(the_fixture(), run_one, data, size);
}
