// Starting a helper daemon on demand: finding its program, starting it
// detached, and making sure racing clients start exactly one.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "uipc/core/error.hpp"
#include "uipc/core/unique_fd.hpp"

namespace uipc {

/// Where a daemon program is looked for.
///
/// An explicit path, else the environment variable's value, is the only
/// candidate when given (an override that quietly fell back elsewhere would
/// hide a typo): with a '/' it is a path (relative to the working directory),
/// without one a name looked up on $PATH. Otherwise `name` is looked for
/// beside the calling program (the directory of /proc/self/exe: a build tree
/// keeps all its programs in one directory), then in the install prefix's
/// bindir, then on $PATH (empty entries, meaning the working directory, are
/// skipped; an unset $PATH is not searched).
struct program_search {
  std::string name;                  ///< e.g. "uipc-handled"
  std::string explicit_path;         ///< an option of the caller; empty: none
  std::string environment_variable;  ///< e.g. "UIPC_HANDLED_PATH"; empty: none
};

/// What a search and a start did, for a message a person can act on.
struct start_report {
  /// Each candidate looked at, in order, with what was wrong with it.
  std::vector<std::string> tried;
  /// The program found (an absolute path); empty when none was.
  std::string program;
  /// The started daemon's pid; 0 when none was started.
  std::int32_t pid = 0;
  /// How the start ended when it failed ("exited before serving", ...).
  std::string outcome;

  /// One line: the program or the candidates tried, and the outcome.
  std::string describe() const;
};

/// The bin directory of the install prefix, as configured at build time.
const char* install_bindir() noexcept;

/// Finds the program (see program_search). errc::program_not_found when no
/// candidate exists; errc::program_not_executable when one exists but none
/// can be executed (not a regular file, no execute permission). `report`,
/// when given, gets every candidate tried and the program found.
result<std::string> find_program(const program_search& search, start_report* report = nullptr);

/// A daemon started by spawn_detached().
struct started_daemon {
  std::int32_t pid = 0;
  /// Readable once the daemon has exited; empty where pidfd_open is missing.
  unique_fd pidfd;
};

/// Starts `program` (an absolute path) with `arguments` (argv[1]...) detached:
/// fork, setsid, fork again (the daemon is nobody's child, so nobody has to
/// reap it), then exec in "/", with umask 077, every signal unblocked,
/// standard streams on /dev/null (stderr kept when `keep_stderr`), and no
/// descriptor of the caller. Safe in a multithreaded caller, also one whose
/// other threads fork meanwhile (their children's copies of our descriptors
/// hold nothing up). Returns once the daemon has exec'd or its exec failed;
/// a daemon still short of its exec at `deadline` counts as started (its
/// pidfd reports a later death).
/// Errors: errc::program_not_executable (exec refused it; the errno is in the
/// report's outcome), errc::program_not_found (gone since it was found), or
/// the system error of socketpair/fork.
result<started_daemon> spawn_detached(
    const std::string& program, const std::vector<std::string>& arguments, bool keep_stderr = false,
    start_report* report = nullptr,
    std::chrono::steady_clock::time_point deadline = std::chrono::steady_clock::time_point::max());

/// How to start a server when none answers.
struct server_start {
  /// Held while one client starts the server (rendezvous_paths::start_lock_path).
  std::string start_lock_path;
  program_search program;
  std::vector<std::string> arguments;
  bool keep_stderr = false;
};

/// Tries to reach the server until `deadline`: {} when reached (the function
/// keeps what it made, e.g. the connection), an error otherwise.
using reach_function = std::function<error_code(std::chrono::steady_clock::time_point deadline)>;
/// Whether an error of reach_function means nobody serves (yet): a missing or
/// refusing socket, a server that went away. Other errors end the attempt.
using absent_function = std::function<bool(const error_code&)>;

/// Reaches the server, starting it first if nobody serves: exactly one of any
/// number of racing callers (threads or processes) starts it. The start lock
/// is taken and `reach` asked again before starting, so a caller that waited
/// for another's start finds that server. A started daemon is asked until it
/// serves, the deadline passes, or it exits.
///
/// Errors: those of `reach` that are not absences; errc::program_not_found and
/// errc::program_not_executable (from the search or exec), errc::program_exited
/// (started, then gone before it served), errc::start_timeout (nobody served
/// by the deadline, the start lock held by another included); those of the
/// start lock. Each caller in a race that fails reports its own attempt.
/// `report`, when given, says what was tried.
error_code reach_or_start(const server_start& how, const reach_function& reach,
                          const absent_function& absent,
                          std::chrono::steady_clock::time_point deadline,
                          start_report* report = nullptr);

}  // namespace uipc
