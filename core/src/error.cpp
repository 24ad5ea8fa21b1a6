// The "uipc" condition category, the table-driven module category, and the
// "uipc.core" category built with it.
//
// Why the comparison works this way: Boost asks both sides of `ec == cond`.
// A module's codes answer for themselves (module_category::equivalent reads
// the row's condition), so the condition category need not know any module;
// it answers only for codes whose category cannot know about us: the system's,
// the generic one and Asio's. No registry, no dynamic_cast.
#include "uipc/core/error.hpp"

#include <boost/asio/error.hpp>
#include <cerrno>
#include <cstdlib>
#include <optional>
#include <string>

#include "uipc/core/error_category.hpp"

namespace uipc {
namespace {

// What an errno value means portably; after Cap'n Proto's kj::typeOfErrno.
std::optional<condition> errno_condition(int value) noexcept {
  switch (value) {
    case EPIPE:
    case ECONNRESET:
    case ECONNABORTED:
    case ECONNREFUSED:
    case ENOTCONN:
    case ESHUTDOWN:
    case EHOSTDOWN:
    case EHOSTUNREACH:
    case ENETDOWN:
    case ENETRESET:
    case ENETUNREACH:
      return condition::disconnected;
    case ETIMEDOUT:
      return condition::timed_out;
    case ENOBUFS:
    case ENOMEM:
    case EMFILE:
    case ENFILE:
    case ENOSPC:
    case EDQUOT:
    case ENOLCK:
      return condition::no_buffers;
    case ENOSYS:
    case EOPNOTSUPP:
#if ENOTSUP != EOPNOTSUPP
    case ENOTSUP:
#endif
      return condition::unimplemented;
    case EPROTO:
    case EBADMSG:
      return condition::protocol_violation;
    case EACCES:
    case EPERM:
      return condition::permission_denied;
    case ENOENT:
    case ESRCH:
      return condition::not_found;
    default:
      return std::nullopt;
  }
}

// Codes of categories that know nothing of ours.
std::optional<condition> foreign_condition(const error_code& code) noexcept {
  const auto& category = code.category();
  if (category == boost::system::system_category() ||
      category == boost::system::generic_category()) {
    return errno_condition(code.value());
  }
  namespace asio_error = boost::asio::error;
  if (category == asio_error::get_misc_category()) {
    if (code.value() == asio_error::eof) return condition::disconnected;
    if (code.value() == asio_error::not_found) return condition::not_found;
  }
  if (category == asio_error::get_netdb_category() && code.value() == asio_error::host_not_found) {
    return condition::not_found;
  }
  if (category == asio_error::get_addrinfo_category() &&
      code.value() == asio_error::service_not_found) {
    return condition::not_found;
  }
  return std::nullopt;
}

class condition_category_impl final : public boost::system::error_category {
 public:
  // A fixed id: the category still matches itself when two shared objects each carry a copy.
  constexpr condition_category_impl() noexcept : error_category(0x75697063'636f6e64u) {}

  const char* name() const noexcept override { return "uipc"; }

  std::string message(int value) const override {
    switch (static_cast<condition>(value)) {
      case condition::disconnected:
        return "disconnected from the peer";
      case condition::timed_out:
        return "timed out";
      case condition::shutting_down:
        return "shutting down";
      case condition::no_buffers:
        return "overloaded: out of buffers or another resource";
      case condition::unimplemented:
        return "not implemented by the peer";
      case condition::protocol_violation:
        return "protocol violation";
      case condition::permission_denied:
        return "permission denied";
      case condition::not_found:
        return "not found";
    }
    return "unknown uipc condition " + std::to_string(value);
  }

  using error_category::equivalent;
  bool equivalent(const error_code& code, int value) const noexcept override {
    const auto c = foreign_condition(code);
    return c && static_cast<int>(*c) == value;
  }
};

constexpr condition_category_impl condition_instance;

}  // namespace

const boost::system::error_category& condition_category() noexcept { return condition_instance; }

// ------------------------------------------------------------ module_category

void module_category::rows_not_in_enumerator_order() noexcept { std::abort(); }

const error_description* module_category::find(int value) const noexcept {
  if (value < 1 || static_cast<std::size_t>(value) > rows_.size()) return nullptr;
  return &rows_[static_cast<std::size_t>(value) - 1];
}

std::string module_category::message(int value) const {
  if (const auto* row = find(value)) return row->message;
  return std::string("unknown ") + name_ + " error " + std::to_string(value);
}

boost::system::error_condition module_category::default_error_condition(int value) const noexcept {
  const auto* row = find(value);
  if (row != nullptr && row->generic != boost::system::errc::success) {
    return boost::system::errc::make_error_condition(row->generic);
  }
  return {value, *this};
}

bool module_category::equivalent(int value,
                                 const boost::system::error_condition& cond) const noexcept {
  if (cond.category() == condition_category()) {
    const auto c = portable_condition(value);
    return c && static_cast<int>(*c) == cond.value();
  }
  return default_error_condition(value) == cond;
}

std::optional<condition> module_category::portable_condition(int value) const noexcept {
  const auto* row = find(value);
  return row != nullptr ? row->portable : std::nullopt;
}

// ------------------------------------------------------------ uipc.core

namespace {

using generic = boost::system::errc::errc_t;

constexpr error_description core_descriptions[] = {
    {errc::frame_too_large, "frame larger than the maximum frame size",
     condition::protocol_violation, generic::message_size},
    {errc::short_frame, "connection closed in the middle of a frame", condition::disconnected},
    {errc::bad_frame, "frame is not a valid envelope", condition::protocol_violation},
    {errc::peer_closed, "peer closed the connection", condition::disconnected,
     generic::connection_reset},
    {errc::shutting_down, "shutting down", condition::shutting_down},
    {errc::address_in_use, "a live listener already serves this socket path", std::nullopt,
     generic::address_in_use},
    {errc::not_a_socket, "path exists and is not a socket", std::nullopt, generic::not_a_socket},
    {errc::timed_out, "peer did not send a complete frame in time", condition::timed_out,
     generic::timed_out},
    {errc::too_many_fds, "too many file descriptors in one frame", condition::protocol_violation},
    {errc::bad_segment, "shared-memory segment has a foreign or stale header",
     condition::protocol_violation},
    {errc::pool_exhausted, "no buffer is free in the pool", condition::no_buffers},
    {errc::not_held, "holder has no reference to release"},
    {errc::unsafe_directory, "runtime directory is not owned by the user or is open to others",
     condition::permission_denied},
    {errc::remote_error, "peer reported an error of an unknown category"},
    {errc::bad_request, "request does not parse as its type's message",
     condition::protocol_violation},
    {errc::unknown_request, "no handler serves this request type", condition::unimplemented},
    {errc::permission_denied, "refused by the server's admission rule",
     condition::permission_denied},
    {errc::bad_reply, "reply does not parse as the expected message",
     condition::protocol_violation},
    {errc::program_not_found, "daemon program not found", condition::not_found},
    {errc::program_not_executable, "daemon program is not executable"},
    {errc::program_exited, "daemon program exited before it served"},
    {errc::start_timeout, "daemon did not serve in time", condition::timed_out},
    {errc::invalid_name, "name breaks the rules (characters or length)"},
    {errc::foreign_owner, "directory or socket is owned by another user",
     condition::permission_denied},
    {errc::wrong_server, "server runs as another user than the one asked for",
     condition::permission_denied},
};

constexpr module_category core_instance("uipc.core", core_descriptions);

}  // namespace

const boost::system::error_category& core_category() noexcept { return core_instance; }

}  // namespace uipc
