// One test plug-in source, built as several shared objects: a good one in two
// versions (for reload), and one per way a plug-in can be broken.
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>

#include "uipc/plugin/abi.h"

#ifndef VARIANT_VERSION
#define VARIANT_VERSION 1
#endif

namespace {

const uipc_plugin_host_api* host;

// "version": returns the build's version.
[[maybe_unused]] std::uint64_t version(uipc_plugin_context*, void*, void*) {
  return VARIANT_VERSION;
}

// "block": arg points to a descriptor; waits (a yield point) until it is
// readable, then returns the version.
[[maybe_unused]] std::uint64_t block(uipc_plugin_context* ctx, void*, void* arg) {
  short revents = 0;
  host->wait_fd(ctx, *static_cast<int*>(arg), 1 /* POLLIN */, 10000, &revents);
  return VARIANT_VERSION;
}

// "echo" (bytes): the request, copied into the caller's pool.
[[maybe_unused]] std::uint64_t echo(uipc_plugin_context* ctx, void*, void* arg) {
  auto* call = static_cast<uipc_plugin_bytes_call*>(arg);
  void* out = nullptr;
  if (call->in_size &&
      host->pool_alloc(host->context_pool(ctx), call->in_size, &out) != UIPC_PLUGIN_OK)
    return 1;
  if (call->in_size) std::memcpy(out, call->in, call->in_size);
  call->out = out;
  call->out_size = call->in_size;
  return VARIANT_VERSION;
}

// "defer": arg points to an int, which a cleanup of the caller's context sets
// to the build's version when the context ends: this build's code, run then.
[[maybe_unused]] void set_version(void* version_out) {
  *static_cast<int*>(version_out) = VARIANT_VERSION;
}
[[maybe_unused]] std::uint64_t defer(uipc_plugin_context* ctx, void*, void* arg) {
  return static_cast<std::uint64_t>(host->pool_cleanup(host->context_pool(ctx), set_version, arg));
}

// "crash" (bytes): takes the process down.
[[maybe_unused]] std::uint64_t crash(uipc_plugin_context*, void*, void*) { std::abort(); }

// "hang" (bytes): never returns (for a while).
[[maybe_unused]] std::uint64_t hang(uipc_plugin_context*, void*, void*) {
  std::this_thread::sleep_for(std::chrono::seconds(30));
  return 0;
}

// "getenv" (bytes): the value of the environment variable the request names
// (empty if unset).
[[maybe_unused]] std::uint64_t get_env(uipc_plugin_context* ctx, void*, void* arg) {
  auto* call = static_cast<uipc_plugin_bytes_call*>(arg);
  const std::string name(static_cast<const char*>(call->in), call->in_size);
  const char* value = std::getenv(name.c_str());
  const std::size_t n = value ? std::strlen(value) : 0;
  void* out = nullptr;
  if (n && host->pool_alloc(host->context_pool(ctx), n, &out) != UIPC_PLUGIN_OK) return 1;
  if (n) std::memcpy(out, value, n);
  call->out = out;
  call->out_size = n;
  return 0;
}

// "throws": a C++ exception out of a service.
[[maybe_unused]] std::uint64_t throws(uipc_plugin_context*, void*, void*) {
  throw std::runtime_error("service failed");
}

// "add" (bytes): registers, after Init, a bytes service named by the request
// that echoes; the status as the result.
[[maybe_unused]] std::uint64_t add(uipc_plugin_context* ctx, void*, void* arg) {
  auto* call = static_cast<uipc_plugin_bytes_call*>(arg);
  const std::string name(static_cast<const char*>(call->in), call->in_size);
  return static_cast<std::uint64_t>(
      host->register_service(ctx, name.c_str(), echo, nullptr, UIPC_PLUGIN_SERVICE_BYTES));
}

// "drop" (bytes): unregisters its service named by the request; the status.
[[maybe_unused]] std::uint64_t drop(uipc_plugin_context* ctx, void*, void* arg) {
  auto* call = static_cast<uipc_plugin_bytes_call*>(arg);
  const std::string name(static_cast<const char*>(call->in), call->in_size);
  return static_cast<std::uint64_t>(host->register_service(ctx, name.c_str(), nullptr, nullptr, 0));
}

// Replies with `text`, copied into the caller's pool.
std::uint64_t reply_text(uipc_plugin_context* ctx, uipc_plugin_bytes_call* call,
                         const std::string& text, std::uint64_t value) {
  void* out = nullptr;
  if (!text.empty() &&
      host->pool_alloc(host->context_pool(ctx), text.size(), &out) != UIPC_PLUGIN_OK)
    return 1;
  if (!text.empty()) std::memcpy(out, text.data(), text.size());
  call->out = out;
  call->out_size = text.size();
  return value;
}

// "forward" (bytes): the request is NAME, a NUL, then a payload; calls bytes
// service NAME with the payload (wherever it is: here, or in the host for an
// isolated build). Replies with its reply, or with the text of the status it
// failed with; the status is the result.
[[maybe_unused]] std::uint64_t forward(uipc_plugin_context* ctx, void*, void* arg) {
  auto* call = static_cast<uipc_plugin_bytes_call*>(arg);
  const std::string request(static_cast<const char*>(call->in), call->in_size);
  const auto nul = request.find('\0');
  const std::string name = request.substr(0, nul);
  const std::string payload = nul == std::string::npos ? "" : request.substr(nul + 1);
  uipc_plugin_bytes_call inner{
      sizeof(uipc_plugin_bytes_call), 0, payload.data(), payload.size(), nullptr, 0};
  std::uint64_t ignored = 0;
  const int status = host->call_service(ctx, name.c_str(), &inner, &ignored);
  if (status != UIPC_PLUGIN_OK)
    return reply_text(ctx, call, host->status_text(status), static_cast<std::uint64_t>(status));
  call->out = inner.out;
  call->out_size = inner.out_size;
  return UIPC_PLUGIN_OK;
}

// "services" (bytes): the services this plug-in's host lists.
[[maybe_unused]] std::uint64_t services(uipc_plugin_context* ctx, void*, void* arg) {
  char* list = nullptr;
  std::size_t length = 0;
  const int status = host->list_services(ctx, &list, &length);
  if (status != UIPC_PLUGIN_OK) return static_cast<std::uint64_t>(status);
  auto* call = static_cast<uipc_plugin_bytes_call*>(arg);
  call->out = list;
  call->out_size = length;
  return UIPC_PLUGIN_OK;
}

// Service events this plug-in was told of: "+NAME\n" added, "-NAME\n" removed.
std::mutex events_mutex;
std::string events_seen;
[[maybe_unused]] void on_service_event(uipc_plugin_context*, const char* name, int event) {
  std::lock_guard lock(events_mutex);
  events_seen += (event == UIPC_PLUGIN_SERVICE_REMOVED ? "-" : "+") + std::string(name) + "\n";
}

// "events" (bytes): the service events so far.
[[maybe_unused]] std::uint64_t events(uipc_plugin_context* ctx, void*, void* arg) {
  std::string seen;
  {
    std::lock_guard lock(events_mutex);
    seen = events_seen;
  }
  return reply_text(ctx, static_cast<uipc_plugin_bytes_call*>(arg), seen, UIPC_PLUGIN_OK);
}

int init(uipc_plugin_context* ctx, const uipc_plugin_host_api* api) {
#ifdef VARIANT_SLOW_INIT
  // Says it is inside Init (a file named by the test), then takes its time.
  if (const char* mark = std::getenv("UIPC_TEST_SLOW_INIT_MARK")) {
    if (std::FILE* f = std::fopen(mark, "w")) std::fclose(f);
  }
  std::this_thread::sleep_for(std::chrono::seconds(1));
#endif
#ifdef VARIANT_INIT_FAILS
  (void)ctx;
  (void)api;
  return 7;
#else
  host = api;
  struct service {
    const char* name;
    uipc_plugin_service_fn fn;
    std::uint32_t flags;
  };
  constexpr std::uint32_t bytes = UIPC_PLUGIN_SERVICE_BYTES;
  const service served[] = {
    {"version", version, 0},
    {"block", block, 0},
    {"throws", throws, 0},
    {"defer", defer, 0},
    {"echo", echo, bytes},
    {"crash", crash, bytes},
    {"hang", hang, bytes},
    {"getenv", get_env, bytes},
    {"add", add, bytes},
    {"drop", drop, bytes},
    {"forward", forward, bytes},
    {"services", services, bytes},
    {"events", events, bytes},
#if VARIANT_VERSION == 1
    // Only the first build serves this: a reload to version 2 drops it.
    {"only in one", version, 0},
#endif
  };
  int s = UIPC_PLUGIN_OK;
  for (const auto& sv : served) {
    s = host->register_service(ctx, sv.name, sv.fn, nullptr, sv.flags);
    if (s != UIPC_PLUGIN_OK) break;
  }
  return s;
#endif
}

// Shutdown says goodbye through the bytes service "farewell" where one is
// registered (a test's host serves it to an isolated build).
void shutdown(uipc_plugin_context* ctx) {
  uipc_plugin_bytes_call call{sizeof(uipc_plugin_bytes_call), 0, "bye", 3, nullptr, 0};
  std::uint64_t ignored = 0;
  (void)host->call_service(ctx, "farewell", &call, &ignored);
  host = nullptr;
}

uipc_plugin_info info{sizeof(uipc_plugin_info),
                      UIPC_PLUGIN_ABI_MAJOR,
                      UIPC_PLUGIN_ABI_MINOR,
#ifdef VARIANT_BAD_NAME
                      "bad-name",
#else
                      "variant",
#endif
                      UIPC_PLUGIN_PREEMPTIVE,
                      0,
                      init,
                      shutdown,
                      on_service_event};

}  // namespace

#ifdef VARIANT_NO_ENTRY
extern "C" UIPC_PLUGIN_EXPORT const uipc_plugin_info* uipc_plugin_entry_misspelt(std::uint32_t,
                                                                                 std::uint32_t) {
  return &info;
}
#else
extern "C" UIPC_PLUGIN_EXPORT const uipc_plugin_info* uipc_plugin_entry(std::uint32_t,
                                                                        std::uint32_t) {
#ifdef VARIANT_REFUSES
  return nullptr;
#endif
#ifdef VARIANT_NEWER_MAJOR
  info.abi_major = UIPC_PLUGIN_ABI_MAJOR + 1;
#endif
#ifdef VARIANT_TRUNCATED
  info.size = 8;
#endif
#ifdef VARIANT_OLDER_MINOR
  // A plug-in built against a host whose description ended before service_event.
  info.size = offsetof(uipc_plugin_info, service_event);
#endif
  return &info;
}
#endif
