// In-process plug-ins for the tests: a plug-in whose init, shutdown, event
// callback and services are lambdas, loaded through a plain entry function.
#pragma once

#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <functional>
#include <list>
#include <memory>
#include <string>

#include "uipc/plugin/abi.h"
#include "uipc/plugin/host.hpp"

namespace uipc::plugin::test {

using service_body = std::function<std::uint64_t(uipc_plugin_context*, void* arg)>;

/// The trampoline every lambda service is registered with; `data` is the body.
inline std::uint64_t run_body(uipc_plugin_context* ctx, void* data, void* arg) {
  return (*static_cast<service_body*>(data))(ctx, arg);
}

/// One in-process plug-in. Make it, fill it, host.load(p.entry()).
struct fake_plugin {
  std::string name;
  std::uint32_t flags = 0;  // UIPC_PLUGIN_PREEMPTIVE or 0
  std::function<int(uipc_plugin_context*)> init;
  std::function<void(uipc_plugin_context*)> shutdown;
  std::function<void(const std::string&, int)> on_event;
  // Filled by the host at init.
  const uipc_plugin_host_api* api = nullptr;
  std::atomic<int> shutdowns{0};
  std::atomic<int> inits{0};
  std::list<service_body> bodies;  // stable addresses

  /// Registers `body` as service `name` (call from init or a service).
  int serve(uipc_plugin_context* ctx, const char* service, service_body body,
            std::uint32_t service_flags = 0) {
    bodies.push_back(std::move(body));
    return api->register_service(ctx, service, run_body, &bodies.back(), service_flags);
  }

  uipc_plugin_entry_fn entry();
  uipc_plugin_info info{};
};

inline std::array<fake_plugin*, 32> fake_slots{};

template <std::size_t N>
struct fake_trampolines {
  static int init(uipc_plugin_context* ctx, const uipc_plugin_host_api* api) {
    auto* p = fake_slots[N];
    p->api = api;
    ++p->inits;
    return p->init ? p->init(ctx) : 0;
  }
  static void shutdown(uipc_plugin_context* ctx) {
    auto* p = fake_slots[N];
    ++p->shutdowns;
    if (p->shutdown) p->shutdown(ctx);
  }
  static void event(uipc_plugin_context*, const char* name, int what) {
    auto* p = fake_slots[N];
    if (p->on_event) p->on_event(name, what);
  }
  static const uipc_plugin_info* entry(std::uint32_t, std::uint32_t) {
    auto* p = fake_slots[N];
    p->info = uipc_plugin_info{sizeof(uipc_plugin_info),
                               UIPC_PLUGIN_ABI_MAJOR,
                               UIPC_PLUGIN_ABI_MINOR,
                               p->name.c_str(),
                               p->flags,
                               0,
                               init,
                               shutdown,
                               p->on_event ? event : nullptr};
    return &p->info;
  }
};

template <std::size_t... I>
constexpr std::array<uipc_plugin_entry_fn, sizeof...(I)> make_entries(std::index_sequence<I...>) {
  return {&fake_trampolines<I>::entry...};
}
inline constexpr auto fake_entries = make_entries(std::make_index_sequence<32>());

inline uipc_plugin_entry_fn fake_plugin::entry() {
  for (std::size_t i = 0; i < fake_slots.size(); ++i) {
    if (fake_slots[i] == this) return fake_entries[i];
    if (!fake_slots[i]) {
      fake_slots[i] = this;
      return fake_entries[i];
    }
  }
  ADD_FAILURE() << "too many fake plug-ins in one test";
  return nullptr;
}

/// Frees the slots of a test's fake plug-ins (a fixture's TearDown).
inline void forget_fake_plugins() { fake_slots.fill(nullptr); }

/// A host for a test, its log lines kept.
struct logged_host {
  std::vector<std::string> lines;
  std::mutex mutex;
  std::unique_ptr<host> h;
  explicit logged_host(host_options options = {}) {
    options.log = [this](int level, std::string_view text) {
      std::lock_guard lock(mutex);
      if (level <= 1) lines.emplace_back(text);
    };
    h = host::create(std::move(options)).value();
  }
  std::string log() {
    std::lock_guard lock(mutex);
    std::string all;
    for (auto& l : lines) all += l + "\n";
    return all;
  }
};

inline std::string text(std::span<const std::byte> bytes) {
  return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}
inline std::span<const std::byte> bytes(std::string_view s) {
  return std::as_bytes(std::span(s.data(), s.size()));
}

}  // namespace uipc::plugin::test
