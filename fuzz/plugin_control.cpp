// Fuzz target: the plug-in host's control requests (control_answer)
// What any process of the host's user sends to its control point; the input
// is one request as it arrives. The host serves a linked-in plug-in with a
// bytes service and a pointer service. Checked beyond "no crash": every
// reply is "ok\n" and a body, or one "error\t<reason>\n" line with no other
// line break, and a request refused left the plug-ins as they were.
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>

#include "fuzz_support.hpp"
#include "uipc/plugin/control.hpp"
#include "uipc/plugin/host.hpp"

namespace {

using namespace uipc::plugin;

const uipc_plugin_host_api* api;

std::uint64_t echo(uipc_plugin_context* ctx, void*, void* arg) {
  auto* call = static_cast<uipc_plugin_bytes_call*>(arg);
  void* out = nullptr;
  if (call->in_size &&
      api->pool_alloc(api->context_pool(ctx), call->in_size, &out) != UIPC_PLUGIN_OK)
    return 1;
  if (call->in_size) std::memcpy(out, call->in, call->in_size);
  call->out = out;
  call->out_size = call->in_size;
  return 0;
}

std::uint64_t pointer_service(uipc_plugin_context*, void*, void*) { return 7; }

const uipc_plugin_info* entry(std::uint32_t, std::uint32_t) {
  static const uipc_plugin_info info{
      sizeof(uipc_plugin_info),
      UIPC_PLUGIN_ABI_MAJOR,
      UIPC_PLUGIN_ABI_MINOR,
      "fuzzed",
      UIPC_PLUGIN_PREEMPTIVE,
      0,
      [](uipc_plugin_context* ctx, const uipc_plugin_host_api* host_api) {
        api = host_api;
        int s = host_api->register_service(ctx, "echo", echo, nullptr, UIPC_PLUGIN_SERVICE_BYTES);
        return s ? s : host_api->register_service(ctx, "pointer", pointer_service, nullptr, 0);
      },
      nullptr,
      nullptr};
  return &info;
}

host& the_host() {
  static const std::unique_ptr<host> h = [] {
    host_options o;
    o.log = [](int, std::string_view) {};  // refusals are expected here
    auto made = host::create(std::move(o));
    if (!made || !(*made)->load(entry)) std::abort();
    return std::move(*made);
  }();
  return *h;
}

// The plug-ins as the control lists them, without the generations a reload bumps.
std::string plugins(host& h) {
  std::string out;
  for (const auto& p : h.plugins()) {
    out += p.name + '/' + p.state + '/' + std::to_string(p.services.size()) + ';';
    for (const auto& s : p.services) out += s + ',';
  }
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  host& h = the_host();
  const std::string before = plugins(h);
  const std::string reply =
      uipc::plugin::control_answer(h, std::string_view(reinterpret_cast<const char*>(data), size),
                                   std::chrono::milliseconds(100));
  if (reply.rfind("ok\n", 0) == 0) return 0;
  UIPC_FUZZ_CHECK(reply.rfind("error\t", 0) == 0);
  UIPC_FUZZ_CHECK(!reply.empty() && reply.back() == '\n');
  UIPC_FUZZ_CHECK(reply.find('\n') == reply.size() - 1);
  UIPC_FUZZ_CHECK(plugins(h) == before);
  return 0;
}
