// The "uipc.core" error category.
#include "uipc/core/error.hpp"

#include <string>

namespace uipc {
namespace {

class core_category_impl final : public boost::system::error_category {
 public:
  const char* name() const noexcept override { return "uipc.core"; }

  std::string message(int value) const override {
    switch (static_cast<errc>(value)) {
      case errc::frame_too_large: return "frame larger than the maximum frame size";
      case errc::short_frame: return "connection closed in the middle of a frame";
      case errc::bad_frame: return "frame is not a valid envelope";
      case errc::peer_closed: return "peer closed the connection";
      case errc::shutting_down: return "shutting down";
      case errc::address_in_use: return "a live listener already serves this socket path";
      case errc::not_a_socket: return "path exists and is not a socket";
      case errc::timed_out: return "peer did not send a complete frame in time";
      case errc::too_many_fds: return "too many file descriptors in one frame";
      case errc::bad_segment: return "shared-memory segment has a foreign or stale header";
      case errc::pool_exhausted: return "no buffer is free in the pool";
      case errc::not_held: return "holder has no reference to release";
      case errc::unsafe_directory: return "runtime directory is not owned by the user or is open to others";
      case errc::remote_error: return "peer reported an error of an unknown category";
      case errc::bad_request: return "request does not parse as its type's message";
      case errc::unknown_request: return "no handler serves this request type";
      case errc::permission_denied: return "refused by the server's admission rule";
      case errc::bad_reply: return "reply does not parse as the expected message";
      case errc::program_not_found: return "daemon program not found";
      case errc::program_not_executable: return "daemon program is not executable";
      case errc::program_exited: return "daemon program exited before it served";
      case errc::start_timeout: return "daemon did not serve in time";
      case errc::invalid_name: return "name breaks the rules (characters or length)";
      case errc::foreign_owner: return "directory or socket is owned by another user";
      case errc::wrong_server: return "server runs as another user than the one asked for";
    }
    return "unknown uipc.core error " + std::to_string(value);
  }

  // Lets portable code test the obvious ones: ec == boost::system::errc::timed_out.
  boost::system::error_condition default_error_condition(int value) const noexcept override {
    using generic = boost::system::errc::errc_t;
    switch (static_cast<errc>(value)) {
      case errc::frame_too_large: return boost::system::errc::make_error_condition(generic::message_size);
      case errc::timed_out: return boost::system::errc::make_error_condition(generic::timed_out);
      case errc::address_in_use: return boost::system::errc::make_error_condition(generic::address_in_use);
      case errc::not_a_socket: return boost::system::errc::make_error_condition(generic::not_a_socket);
      case errc::peer_closed: return boost::system::errc::make_error_condition(generic::connection_reset);
      default: return {value, *this};
    }
  }
};

}  // namespace

const boost::system::error_category& core_category() noexcept {
  static const core_category_impl instance;
  return instance;
}

}  // namespace uipc
