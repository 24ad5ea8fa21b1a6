// The rules for names the host keeps: plug-ins and services.
#pragma once

#include <algorithm>
#include <string_view>

namespace uipc::plugin::detail {

inline constexpr std::size_t max_name_length = 63;

inline bool alnum_or(std::string_view name, char extra) noexcept {
  if (name.empty() || name.size() > max_name_length) return false;
  return std::all_of(name.begin(), name.end(), [extra](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
           c == extra;
  });
}

/// Plug-in names: letters, digits, '_' and '.', 1 to 63 bytes.
inline bool valid_plugin_name(std::string_view name) noexcept { return alnum_or(name, '.'); }
/// Service names: letters, digits, '_' and ' ', 1 to 63 bytes.
inline bool valid_service_name(std::string_view name) noexcept { return alnum_or(name, ' '); }

}  // namespace uipc::plugin::detail
