// Starting the handle daemon: the client's side of uipc::reach_or_start (the
// program search, the detached start, the start lock), with the daemon's
// arguments and the handles error codes.
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "session.hpp"
#include "uipc/core/daemon_start.hpp"

namespace uipc::handles::detail {

error_code start_daemon(const client_options& options, const resolved_location& where,
                        const reach_function& reach, std::chrono::steady_clock::time_point deadline,
                        start_report* report) {
  server_start how;
  how.start_lock_path = where.start_lock_path;
  how.program = daemon_program(options.daemon_path);
  how.keep_stderr = std::getenv("UIPC_HANDLED_STDERR") != nullptr;
  // The daemon runs in "/": a relative directory means the client's.
  std::error_code ignored;
  how.arguments = {"--directory", std::filesystem::absolute(where.directory, ignored).string(),
                   "--name",      options.where.name,
                   "--linger-ms", std::to_string(options.daemon_linger.count()),
                   "--capacity",  std::to_string(options.daemon_capacity),
                   "--scratch",   std::to_string(options.daemon_scratch_size)};
  const error_code ec = reach_or_start(how, reach, retryable, deadline, report);
  // The program's own faults (not found, not executable) are clearest as core
  // says them; these two keep the handles codes callers already test for.
  if (ec == uipc::errc::program_exited) return make_error_code(errc::daemon_failed_to_start);
  if (ec == uipc::errc::start_timeout) return make_error_code(errc::daemon_start_timeout);
  return ec;
}

}  // namespace uipc::handles::detail
