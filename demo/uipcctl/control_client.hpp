// Asking a control point (the plug-in host's, uipcd's): one text request per
// call, "ok\n" and TAB-separated rows back, or "error\t<why>\n".
#pragma once

#include <chrono>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "uipc/caps/point.hpp"

namespace uipcctl {

/// Which point to ask, how long to wait, and what to call the server in messages.
struct control_target {
  uipc::caps::point_address address;
  std::chrono::milliseconds timeout{5000};
  const char* server = "plug-in host";
};

/// One of --point NAME, --dir DIR, --timeout MS at args[i]: taken (i moves
/// past it), other (not one of them), or bad (a missing or bad value).
enum class option_result { taken, other, bad };
option_result take_target_option(std::span<char* const> args, std::size_t& i, control_target& t);

/// Takes --point NAME, --dir DIR and --timeout MS from anywhere in `args`
/// into `t` (the point defaulting to `default_point`, of this user); the
/// other arguments go to `rest` in order. False for a bad option value.
bool split_target(std::span<char* const> args, control_target& t, std::string_view default_point,
                  std::vector<std::string_view>& rest);

/// Sends one request. On success returns true and the body in `body`; on
/// failure prints why (prefixed "uipcctl COMMAND: ") and returns false.
bool ask(const char* command, const control_target& t, const std::string& request,
         std::string& body);

/// Prints TAB-separated rows as aligned columns (the last one not padded).
void print_table(std::string_view body);

}  // namespace uipcctl
