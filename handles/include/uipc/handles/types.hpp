// Value types shared by the handle daemon and its clients.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "uipc/core/daemon_start.hpp"
#include "uipc/core/error.hpp"
#include "uipc/core/rendezvous.hpp"

namespace uipc::handles {

/// What a handle names.
enum class object_type : std::uint32_t {
  none = 0,
  manual_event = 1,  ///< stays signalled until reset; a signal wakes every waiter
  auto_event = 2,    ///< a successful wait resets it; a signal wakes one waiter
  mutex = 3,         ///< owned by a thread, recursive, abandoned when its owner dies
  semaphore = 4,     ///< a count between 0 and a maximum; a wait takes one
};

/// "manual_event", "auto_event", "mutex", "semaphore" or "none".
const char* to_string(object_type t) noexcept;

/// A slot of the daemon's table and the generation it had when the handle was
/// issued: a slot closed and reused gets a new generation, so an old handle is
/// refused (errc::stale_handle) instead of reaching the new object.
struct handle_id {
  std::uint32_t index = 0;
  std::uint32_t generation = 0;
  friend bool operator==(const handle_id&, const handle_id&) = default;
};

/// "index:generation".
std::string to_string(handle_id h);
/// Parses "index:generation"; errc::invalid_argument otherwise.
result<handle_id> parse_handle_id(const std::string& text);

/// How a wait ended (errors are reported through result<> instead).
enum class wait_status {
  signalled,  ///< the object(s) were signalled and, where that consumes, taken
  abandoned,  ///< a mutex was taken whose previous owner died holding it
  timed_out,  ///< the timeout passed first; nothing was taken
};

/// The outcome of a wait on several objects.
struct wait_result {
  wait_status status = wait_status::timed_out;
  /// wait_any: which object (position in the wait set). wait_all: with status
  /// abandoned, the first abandoned mutex; else 0.
  std::size_t index = 0;
};

/// Where one handle daemon lives. Clients and the daemon derive the socket path
/// and the start lock from it, so both must be given the same.
struct location {
  /// Private directory for the socket; empty: uipc::runtime_directory().
  std::string directory;
  /// Names the daemon instance: socket "<directory>/uipc-<name>.sock".
  /// Letters, digits, '_', '-'; at most 64 bytes (location_name_rules).
  std::string name = "handles";
};

/// The rules of location::name (one path component, part of a socket path).
inline constexpr name_rules location_name_rules{1, 64, "_-"};

/// The resolved paths of a location (see uipc::derive_rendezvous_paths).
using resolved_location = rendezvous_paths;

/// Resolves `where` (creating and checking the directory as runtime_directory()
/// does). A name that breaks location_name_rules is errc::invalid_argument.
result<resolved_location> resolve(const location& where);

/// How a client looks for the daemon program: `explicit_path` (the option
/// client_options::daemon_path), else $UIPC_HANDLED_PATH, else "uipc-handled"
/// beside the calling program, in the install prefix, then on $PATH
/// (see uipc::program_search).
program_search daemon_program(const std::string& explicit_path);

/// Longest object name, in bytes.
inline constexpr std::size_t max_name_length = 63;
/// Most objects in one wait_any / wait_all.
inline constexpr std::size_t max_wait_objects = 64;

/// One entry of client::list() and handle_daemon::objects(): a live object.
struct handle_info {
  handle_id handle;
  object_type type = object_type::none;
  std::uint32_t refcount = 0;
  std::string name;
  std::uint32_t value = 0;  ///< event: signalled 0/1; semaphore: count; mutex: owner tid (0: free)
};

/// One entry of client::clients() and handle_daemon::clients(): a connection
/// to the daemon.
struct client_info {
  std::uint64_t session = 0;  ///< the daemon's number for the connection
  std::int32_t pid = 0;       ///< as the kernel reported it at connect time
  std::uint32_t uid = 0;
  std::uint32_t handles = 0;  ///< distinct objects it holds references on
  std::uint32_t scratch_blocks = 0;
};

}  // namespace uipc::handles
