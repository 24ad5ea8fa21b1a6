// Value types of the handles module: names, handle ids, and where a daemon lives.
#include "uipc/handles/types.hpp"

#include <unistd.h>

#include <charconv>
#include <cstdio>

#include "uipc/core/runtime_dir.hpp"
#include "uipc/handles/error.hpp"

namespace uipc::handles {

const char* to_string(object_type t) noexcept {
  switch (t) {
    case object_type::manual_event:
      return "manual_event";
    case object_type::auto_event:
      return "auto_event";
    case object_type::mutex:
      return "mutex";
    case object_type::semaphore:
      return "semaphore";
    case object_type::none:
      break;
  }
  return "none";
}

std::string to_string(handle_id h) {
  return std::to_string(h.index) + ":" + std::to_string(h.generation);
}

result<handle_id> parse_handle_id(const std::string& text) {
  const auto colon = text.find(':');
  if (colon == std::string::npos) return make_error_code(errc::invalid_argument);
  handle_id h;
  const char* first = text.data();
  const char* mid = first + colon;
  const char* last = first + text.size();
  auto a = std::from_chars(first, mid, h.index);
  auto b = std::from_chars(mid + 1, last, h.generation);
  if (a.ec != std::errc{} || a.ptr != mid || b.ec != std::errc{} || b.ptr != last) {
    return make_error_code(errc::invalid_argument);
  }
  return h;
}

result<resolved_location> resolve(const location& where) {
  if (where.name.empty() || where.name.size() > 64) return make_error_code(errc::invalid_argument);
  for (char c : where.name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '_' || c == '-';
    if (!ok) return make_error_code(errc::invalid_argument);
  }
  auto dir =
      where.directory.empty() ? runtime_directory() : checked_private_directory(where.directory);
  if (!dir) return dir.error();
  resolved_location r;
  r.directory = *dir;
  r.socket_path = r.directory + "/uipc-" + where.name + ".sock";
  r.start_lock_path = r.directory + "/uipc-" + where.name + ".start";
  // FNV-1a of the directory: two daemons of one user in different directories
  // (tests, containers) get different segments.
  std::uint64_t hash = 0xcbf29ce484222325ULL;
  for (unsigned char c : r.directory) hash = (hash ^ c) * 0x100000001b3ULL;
  char suffix[32];
  std::snprintf(suffix, sizeof suffix, "%08x", static_cast<unsigned>(hash ^ (hash >> 32)));
  r.segment_name = "uipc-" + where.name + "-" + std::to_string(::getuid()) + "-" + suffix;
  return r;
}

}  // namespace uipc::handles
