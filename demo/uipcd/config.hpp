// uipcd's configuration: what the file says, what flags override, what
// --print-config prints.
//
// The file is INI-like: `[section]` lines, then `key = value` lines; `#`
// starts a comment; blank lines are ignored. Every key has a default, so an
// empty file (or none) is a working configuration. print() writes the whole
// configuration in this format, each key with a comment saying what it does.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace uipcd {

struct config {
  // [server]
  unsigned threads = 2;                   ///< event-loop threads
  std::chrono::milliseconds drain{5000};  ///< SIGTERM: the longest wait for work in flight
  // [handles]
  bool handles = true;
  std::string handles_directory;  ///< empty: as uipc-handled ($XDG_RUNTIME_DIR/uipc, ...)
  std::string handles_name = "handles";
  std::uint32_t handles_capacity = 4096;
  std::uint64_t handles_scratch = 1 << 20;
  // [dns]
  bool dns = true;
  std::string dns_listen = "127.0.0.1:5300";
  std::string dns_service = "dns answer";  ///< the plug-in service that answers
  std::string dns_zone;                    ///< empty: the zone plug-in's built-in zone
  std::uint32_t dns_buffers = 1024;
  std::chrono::milliseconds dns_timeout{1000};  ///< a query's deadline inside the plug-in
  // [plugins]
  std::string plugins_directory;  ///< empty: the example plug-ins of this build or install
  std::vector<std::string> isolate{
      "hello"};  ///< plug-ins (file names without .so) run in their own process
  // [caps]
  std::string caps_directory;  ///< empty: the shared rendezvous directory
  std::string control_point = "uipc.control";
  std::string plugins_point =
      "uipc.plugins";  ///< the plug-in host's own control point; empty: none
  std::string echo_point =
      "uipc.echo";  ///< a point answering each request with its bytes; empty: none
  // [metrics]
  std::string metrics;  ///< empty: off; else 127.0.0.1:PORT or [::1]:PORT

  bool operator==(const config&) const = default;
};

/// Sets `key` ("section.key") from `value` as the file would. Returns an empty
/// string, or why the key or value is refused.
std::string set(config& c, std::string_view key, std::string_view value);

/// Applies the file's text to `c`. Returns an empty string, or "line N: why"
/// for the first line refused (then `c` is unchanged).
std::string apply_text(config& c, std::string_view text);

/// Reads and applies the file at `path`: "PATH: line N: why" or "PATH: <errno
/// text>" when refused, `c` unchanged.
std::string apply_file(config& c, const std::string& path);

/// The whole configuration in the file's format, documented.
std::string print(const config& c);

/// A reload: copies into `running` the keys of `next` that a reload may
/// change, and returns the others that differ (they wait for a restart).
std::vector<std::string> adopt_reloadable(config& running, const config& next);

/// The keys whose new value takes effect only at a restart, where `before`
/// and `after` differ ("dns.listen", ...).
std::vector<std::string> needs_restart(const config& before, const config& after);

}  // namespace uipcd
