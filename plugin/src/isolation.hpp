// What an isolated plug-in's record holds: the supervisor of its process.
#pragma once

#include <cstdint>
#include <string>

#include "uipc/plugin/abi.h"
#include "uipc/plugin/host.hpp"

namespace uipc::plugin::detail {

/// The part of a plug-in record that runs it in its own process.
struct isolation {
  virtual ~isolation() = default;
  /// "running", "restarting" or "stopped", the crash count and the last error.
  virtual void status(std::string& state, std::uint32_t& crashes,
                      std::string& last_error) const = 0;
  /// How it was started (a reload starts the new build the same way).
  virtual const isolation_options& options() const = 0;
};

/// The `data` of an isolated plug-in's bytes service.
struct isolation_proxy {
  virtual ~isolation_proxy() = default;
  /// Calls the service in the runner; `arg` is the caller's uipc_plugin_bytes_call.
  virtual int call(uipc_plugin_context* ctx, void* arg, std::uint64_t* out) = 0;
};

}  // namespace uipc::plugin::detail
