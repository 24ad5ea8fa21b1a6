// dns_zone: a plug-in answering DNS queries from a zone file. Preemptive:
// queries run on every thread of the host at once.
//
// Services (bytes):
//   "dns answer"  a query in, its answer out (built in the caller's pool);
//                 returns the answer's response code, or 255 when the message
//                 must be dropped (a response, or shorter than a header).
//   "dns zone"    a zone file's path in: loads it and serves it from then on
//                 (queries in flight finish with the old zone); the reply is
//                 "loaded N records from PATH", or "error\t<why>" with return
//                 value 1, the old zone serving on. No bytes: the built-in zone.
// At init it loads the file named by $UIPC_DNS_ZONE, or serves the built-in
// zone (names under uipc.test) when that is unset or empty; a bad file there
// refuses the load.
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>

#include "dns_message.hpp"
#include "shared_slot.hpp"
#include "uipc/plugin/abi.h"

namespace {

using uipc::dns::zone;

const uipc_plugin_host_api* host = nullptr;
uipcd::shared_slot<zone> current;

constexpr std::size_t answer_room = 1232;  // the usual EDNS UDP size
constexpr std::size_t max_zone_file = std::size_t{64} << 20;
constexpr std::uint64_t dropped = 255;

// Reads and parses `path`; null with `error` set when it cannot.
std::shared_ptr<const zone> load(const std::string& path, std::string& error) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return error = "cannot open " + path + ": " + std::strerror(errno), nullptr;
  std::ostringstream text;
  text << in.rdbuf();
  if (!in && !in.eof()) return error = "cannot read " + path, nullptr;
  const std::string s = std::move(text).str();
  if (s.size() > max_zone_file) return error = path + " is larger than 64 MiB", nullptr;
  std::string why;
  auto z = zone::parse(s, why);
  if (!z) return error = path + ": " + why, nullptr;
  return std::make_shared<const zone>(std::move(*z));
}

std::shared_ptr<const zone> builtin() {
  return {&zone::builtin(), [](const zone*) {}};
}

bool reply(uipc_plugin_context* ctx, uipc_plugin_bytes_call* call, const void* bytes,
           std::size_t size) {
  void* out = nullptr;
  if (host->pool_alloc(host->context_pool(ctx), size == 0 ? 1 : size, &out) != UIPC_PLUGIN_OK)
    return false;
  std::memcpy(out, bytes, size);
  call->out = out;
  call->out_size = size;
  return true;
}

std::uint64_t answer(uipc_plugin_context* ctx, void*, void* arg) {
  auto* call = static_cast<uipc_plugin_bytes_call*>(arg);
  const std::size_t room = call->in_size > answer_room ? call->in_size : answer_room;
  void* out = nullptr;
  if (host->pool_alloc(host->context_pool(ctx), room, &out) != UIPC_PLUGIN_OK) return dropped;
  std::memcpy(out, call->in, call->in_size);
  const std::span<std::byte> buffer(static_cast<std::byte*>(out), room);
  const std::shared_ptr<const zone> z = current.load();
  const std::size_t length = uipc::dns::answer_in_place(buffer, call->in_size, *z);
  if (length == 0) return dropped;
  call->out = out;
  call->out_size = length;
  return uipc::dns::rcode(buffer.first(length));
}

std::uint64_t load_zone(uipc_plugin_context* ctx, void*, void* arg) {
  auto* call = static_cast<uipc_plugin_bytes_call*>(arg);
  const std::string path(static_cast<const char*>(call->in), call->in_size);
  if (path.empty()) {
    current.store(builtin());
    static const char text[] = "serving the built-in zone";
    reply(ctx, call, text, sizeof text - 1);
    return 0;
  }
  std::string error;
  auto z = load(path, error);
  if (!z) {
    const std::string text = "error\t" + error;
    reply(ctx, call, text.data(), text.size());
    return 1;
  }
  const std::string text = "loaded " + std::to_string(z->size()) + " records from " + path;
  current.store(std::move(z));
  reply(ctx, call, text.data(), text.size());
  return 0;
}

int init(uipc_plugin_context* ctx, const uipc_plugin_host_api* api) {
  host = api;
  const char* path = std::getenv("UIPC_DNS_ZONE");
  if (path != nullptr && *path != '\0') {
    std::string error;
    auto z = load(path, error);
    if (!z) {
      host->log(ctx, 0, ("dns_zone: " + error).c_str());
      return UIPC_PLUGIN_E_INIT_FAILED;
    }
    current.store(std::move(z));
  } else {
    current.store(builtin());
  }
  if (int s = host->register_service(ctx, "dns answer", answer, nullptr, UIPC_PLUGIN_SERVICE_BYTES))
    return s;
  return host->register_service(ctx, "dns zone", load_zone, nullptr, UIPC_PLUGIN_SERVICE_BYTES);
}

void shutdown(uipc_plugin_context*) {
  current.store(nullptr);
  host = nullptr;
}

const uipc_plugin_info info = {sizeof(uipc_plugin_info),
                               UIPC_PLUGIN_ABI_MAJOR,
                               UIPC_PLUGIN_ABI_MINOR,
                               "dns_zone",
                               UIPC_PLUGIN_PREEMPTIVE,
                               0,
                               init,
                               shutdown,
                               nullptr};

}  // namespace

extern "C" UIPC_PLUGIN_EXPORT const uipc_plugin_info* uipc_plugin_entry(uint32_t host_major,
                                                                        uint32_t) {
  return host_major == UIPC_PLUGIN_ABI_MAJOR ? &info : nullptr;
}
