// fuzz_seeds DIR: writes the seed corpora of every fuzz target into DIR/<target>/,
// built from valid messages with the real encoders (core's frame encoder, the
// generated protobuf classes, dns::build_query). fuzz/corpus/ holds its output.
#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "dns_message.hpp"
#include "fuzz_support.hpp"
#include "uipc/proto/envelope.pb.h"
#include "uipc/proto/handles.pb.h"
#include "wire.hpp"

namespace {

using namespace uipc;
using fuzz::output;
namespace fs = std::filesystem;
namespace pb = uipc::proto::handles;

fs::path root;

void write(const std::string& target, const std::string& name, const output& o) {
  fs::create_directories(root / target);
  std::ofstream(root / target / name, std::ios::binary) << o.str();
}

std::string encoded(frame_kind kind, std::uint64_t id, std::uint32_t type, std::string payload,
                    std::size_t fds = 0) {
  frame f;
  f.kind = kind;
  f.correlation_id = id;
  f.type = type;
  f.payload = std::move(payload);
  f.fds.resize(fds);  // counted, not sent: the harness attaches the descriptors
  auto bytes = detail::encode_frame(f, 1 << 20);
  return bytes ? *bytes : std::string();
}

output& chunk(output& o, std::uint8_t ctl, const std::string& bytes) {
  return o.byte(ctl).u16(static_cast<std::uint16_t>(bytes.size())).append(bytes);
}

void core_frames() {
  const std::string request = encoded(frame_kind::request, 5, 1, "hello");
  output o;
  chunk(o.byte(0), 0x80, request);
  write("core_frames", "request", o);
  output batch;
  chunk(batch.byte(0), 0,
        request + encoded(frame_kind::notice, 0, 2, "n") + encoded(frame_kind::reply, 1, 7, "r"));
  write("core_frames", "batch", batch);
  output split;
  chunk(chunk(split.byte(0), 0x80, request.substr(0, 3)), 0x80, request.substr(3));
  write("core_frames", "split", split);
  output fds;
  chunk(fds.byte(0x0c), 2, encoded(frame_kind::request, 9, 3, "fds", 2));
  write("core_frames", "descriptors", fds);
  output unannounced;
  chunk(unannounced.byte(0x08), 3, request);
  write("core_frames", "unannounced_descriptors", unannounced);
  output notice;
  chunk(notice.byte(0), 0, detail::encode_error_notice(make_error_code(errc::bad_frame)));
  write("core_frames", "error_notice", notice);
  output large;
  chunk(large.byte(2), 0, encoded(frame_kind::request, 4, 1, std::string(300, 'x')));
  write("core_frames", "too_large", large);
  output empty;
  chunk(empty.byte(0), 0, std::string(4, '\0'));
  write("core_frames", "empty_frame", empty);
  output no_fds;
  chunk(no_fds.byte(1), 1, encoded(frame_kind::notice, 0, 2, "x", 1));
  write("core_frames", "peer_sends_no_fds", no_fds);
}

output& record(output& o, std::uint8_t ctl, const std::string& bytes) {
  return o.byte(ctl).byte(static_cast<std::uint8_t>(bytes.size())).append(bytes);
}

void handles_daemon() {
  constexpr std::uint8_t request = 0, notice = 1 << 5, reply = 2 << 5, named = 3 << 5;
  pb::CreateRequest event;
  event.set_type(pb::MANUAL_EVENT);
  event.set_name("seed");
  pb::CreateRequest mutex;
  mutex.set_type(pb::MUTEX);
  mutex.set_initial_state(true);
  mutex.set_owner_tid(1234);
  pb::CreateRequest semaphore;
  semaphore.set_type(pb::SEMAPHORE);
  semaphore.set_initial_count(1);
  semaphore.set_max_count(3);
  pb::OpenRequest open_by_name;
  open_by_name.set_name("seed");
  pb::ScratchStoreRequest store;
  store.set_size(100);
  pb::ListRequest list;
  list.set_start_index(1);

  output life;
  record(life, request | 2, event.SerializeAsString());
  record(life, request | 2, mutex.SerializeAsString());
  record(life, request | 2, semaphore.SerializeAsString());
  record(life, request | 3, open_by_name.SerializeAsString());
  record(life, named | 3, std::string(1, '\1'));
  record(life, named | 4, std::string(1, '\0'));
  record(life, named | 4, std::string(1, '\0'));  // a second close: not held any more
  record(life, request | 7, list.SerializeAsString());
  write("handles_daemon", "objects", life);

  output scratch;
  record(scratch, request | 5, store.SerializeAsString());
  record(scratch, request | 5, store.SerializeAsString());
  record(scratch, named | 6, std::string(1, '\1'));
  record(scratch, notice | 6, pb::ScratchFreeRequest().SerializeAsString());
  write("handles_daemon", "scratch", scratch);

  output queries;
  record(queries, request | 1, "");
  record(queries, request | 8, "");
  record(queries, request | 9, "");
  record(queries, request | 7, "");
  write("handles_daemon", "queries", queries);

  output odd;
  record(odd, notice | 4, pb::CloseRequest().SerializeAsString());
  record(odd, reply | 2, "");
  record(odd, request | 31, "x");
  record(odd, request | 2, "\xff\xff");
  write("handles_daemon", "odd", odd);

  output raw;
  record(raw, request | 8, "");
  record(raw, 0x80, std::string("\x05\x00\x00\x00garbage", 11));
  write("handles_daemon", "raw", raw);
}

std::string query(std::uint16_t id, const char* name, std::uint16_t type) {
  std::array<std::byte, 512> buf{};
  const std::size_t n = dns::build_query(buf, id, name, type);
  return {reinterpret_cast<const char*>(buf.data()), n};  // NOLINT: bytes as a string
}

void dns_message() {
  auto seed = [](const std::string& name, std::uint8_t room, const std::string& typed,
                 const std::string& message) {
    output o;
    o.byte(room).byte(static_cast<std::uint8_t>(typed.size())).append(typed).append(message);
    write("dns_message", name, o);
  };
  seed("a", 128, "www.uipc.test", query(1, "www.uipc.test", dns::type_a));
  seed("aaaa", 128, "WWW.Uipc.Test.", query(2, "www.uipc.test", dns::type_aaaa));
  seed("txt", 8, "txt", query(3, "txt.uipc.test", dns::type_txt));
  seed("nxdomain", 64, "nowhere.example", query(4, "nowhere.example", dns::type_a));
  std::string chaos = query(5, "uipc.test", dns::type_a);
  chaos[chaos.size() - 1] = 3;  // class CH
  seed("class", 64, "aaaa", chaos);
  std::string status = query(6, "uipc.test", dns::type_a);
  status[2] = static_cast<char>(2 << 3);  // opcode STATUS
  seed("opcode", 64, "16", status);
  std::string reply = query(7, "a.uipc.test", dns::type_a);
  reply[2] = static_cast<char>(0x80);
  seed("response", 64, "a.uipc.test", reply);
}

void dispatch_receive() {
  auto datagram = [](output& o, std::uint8_t ctl, const std::string& bytes) -> output& {
    return o.byte(ctl).u16(static_cast<std::uint16_t>(bytes.size())).append(bytes);
  };
  output queries;
  queries.byte(0);
  datagram(queries, 0, query(1, "www.uipc.test", dns::type_a));
  datagram(queries, 8, query(2, "nowhere.example", dns::type_aaaa));
  datagram(queries, 4, query(3, "txt.uipc.test", dns::type_txt));
  write("dispatch_receive", "queries", queries);
  output replies;
  replies.byte(0);
  const std::string r = query(0, "uipc.test", dns::type_a);
  datagram(replies, 1, r);
  datagram(replies, 2, r);
  datagram(replies, 3 | 8, r);
  datagram(replies, 1 | 4, r);  // right ID, wrong peer
  write("dispatch_receive", "replies", replies);
  output held;
  held.byte(0xff);
  for (int i = 0; i < 12; ++i)
    datagram(held, 0, query(static_cast<std::uint16_t>(i), "a.uipc.test", dns::type_a));
  write("dispatch_receive", "held", held);
  output odd;
  odd.byte(0);
  datagram(odd, 0, "short");
  datagram(odd, 0, std::string(600, 'x'));  // larger than a receive buffer
  datagram(odd, 0, "");
  write("dispatch_receive", "odd", odd);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: fuzz_seeds DIR  (writes DIR/<target>/<seed>)\n");
    return 2;
  }
  root = argv[1];
  core_frames();
  handles_daemon();
  dns_message();
  dispatch_receive();
  return 0;
}
