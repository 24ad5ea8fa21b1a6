// uipcctl's subcommands: each lives in its own file and is listed in main.cpp.
#pragma once

#include <charconv>
#include <cstdio>
#include <optional>
#include <span>
#include <string_view>

namespace uipcctl {

/// `text` as a whole number of type Int; nullopt for anything else (a sign
/// where Int has none, trailing bytes, out of range).
template <class Int>
std::optional<Int> number(std::string_view text) {
  Int value{};
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return value;
}

/// One subcommand: `uipcctl <name> args...`. `run` gets the arguments after the
/// name and returns the process's exit status; `help` prints its usage
/// (`uipcctl <name> --help`).
struct command {
  const char* name;
  const char* summary;
  int (*run)(std::span<char* const> args);
  void (*help)(std::FILE* out);
};

/// `uipcctl handles ...`: the handle daemon (handles_command.cpp).
int run_handles(std::span<char* const> args);
void help_handles(std::FILE* out);

/// `uipcctl caps ...`: capability rendezvous points (caps_command.cpp).
int run_caps(std::span<char* const> args);
void help_caps(std::FILE* out);

/// `uipcctl plugins ...` and `uipcctl services ...`: a plug-in host (plugins_command.cpp).
int run_plugins(std::span<char* const> args);
int run_services(std::span<char* const> args);
void help_plugins(std::FILE* out);
void help_services(std::FILE* out);

/// `uipcctl status|stats|clients|points|reload`: a running uipcd (server_command.cpp).
int run_status(std::span<char* const> args);
int run_stats(std::span<char* const> args);
int run_clients(std::span<char* const> args);
int run_objects(std::span<char* const> args);
int run_points(std::span<char* const> args);
int run_reload(std::span<char* const> args);
void help_server(std::FILE* out);

}  // namespace uipcctl
