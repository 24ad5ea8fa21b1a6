// Value types of the handles module: names, handle ids, and where a daemon lives.
#include "uipc/handles/types.hpp"

#include <charconv>

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
  if (check_name(where.name, location_name_rules)) return make_error_code(errc::invalid_argument);
  auto dir =
      where.directory.empty() ? runtime_directory() : checked_private_directory(where.directory);
  if (!dir) return dir.error();
  return derive_rendezvous_paths(*dir, "uipc-", where.name, location_name_rules);
}

program_search daemon_program(const std::string& explicit_path) {
  return program_search{"uipc-handled", explicit_path, "UIPC_HANDLED_PATH"};
}

}  // namespace uipc::handles
