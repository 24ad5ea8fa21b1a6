// Errors of the plug-in host: the "uipc.plugin" category. The values are the
// C ABI's status codes (uipc/plugin/abi.h), so a code crosses the boundary as is.
#pragma once

#include <type_traits>

#include "uipc/core/error.hpp"
#include "uipc/plugin/abi.h"

namespace uipc::plugin {

/// Plug-in host error codes, equal to UIPC_PLUGIN_E_*.
/// Conditions: service_not_found, plugin_not_found: not_found; memory_limit,
/// no_memory, too_many: no_buffers; timed_out: timed_out; unavailable:
/// disconnected; stopped: shutting_down. The others: none.
enum class errc {
  invalid_name = UIPC_PLUGIN_E_INVALID_NAME,
  duplicate_service = UIPC_PLUGIN_E_DUPLICATE_SERVICE,
  service_not_found = UIPC_PLUGIN_E_SERVICE_NOT_FOUND,
  service_not_compatible = UIPC_PLUGIN_E_SERVICE_NOT_COMPATIBLE,
  not_owner = UIPC_PLUGIN_E_NOT_OWNER,
  wrong_context = UIPC_PLUGIN_E_WRONG_CONTEXT,
  double_free = UIPC_PLUGIN_E_DOUBLE_FREE,
  memory_limit = UIPC_PLUGIN_E_MEMORY_LIMIT,
  no_memory = UIPC_PLUGIN_E_NO_MEMORY,
  context_busy = UIPC_PLUGIN_E_CONTEXT_BUSY,
  invalid_argument = UIPC_PLUGIN_E_INVALID_ARGUMENT,
  timed_out = UIPC_PLUGIN_E_TIMED_OUT,
  plugin_failed = UIPC_PLUGIN_E_PLUGIN_FAILED,
  abi_mismatch = UIPC_PLUGIN_E_ABI_MISMATCH,
  no_entry_point = UIPC_PLUGIN_E_NO_ENTRY_POINT,
  init_failed = UIPC_PLUGIN_E_INIT_FAILED,
  load_failed = UIPC_PLUGIN_E_LOAD_FAILED,
  duplicate_plugin = UIPC_PLUGIN_E_DUPLICATE_PLUGIN,
  plugin_not_found = UIPC_PLUGIN_E_PLUGIN_NOT_FOUND,
  unavailable = UIPC_PLUGIN_E_UNAVAILABLE,
  stopped = UIPC_PLUGIN_E_STOPPED,
  too_many = UIPC_PLUGIN_E_TOO_MANY,
};

/// The category of errc, named "uipc.plugin".
const boost::system::error_category& plugin_category() noexcept;

inline error_code make_error_code(errc e) noexcept {
  return {static_cast<int>(e), plugin_category()};
}

/// A status of the C ABI as an error_code (UIPC_PLUGIN_OK: no error).
inline error_code status_code(int status) noexcept {
  return status == UIPC_PLUGIN_OK ? error_code() : error_code(status, plugin_category());
}

/// The readable text of a C ABI status (static storage).
const char* status_text(int status) noexcept;

}  // namespace uipc::plugin

template <>
struct boost::system::is_error_code_enum<uipc::plugin::errc> : std::true_type {};
