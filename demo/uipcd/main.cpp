// uipcd: the combined server. Every module of uipc on one event loop, as an
// ordinary user, with no configuration needed (server.hpp says what runs).
#include <cstdio>
#include <cstring>
#include <string>
#include <string_view>

#include "server.hpp"
#include "uipc/core/server.hpp"
#include "uipc/core/socket_activation.hpp"

namespace {

int usage(int status) {
  std::fprintf(status == 0 ? stdout : stderr,
               "usage: uipcd [--config FILE] [--set SECTION.KEY=VALUE]... [--listen ADDR:PORT]\n"
               "             [--plugins DIR] [--zone FILE] [--metrics ADDR:PORT] [--dir DIR]\n"
               "             [--threads N] [--print-config]\n"
               "Runs the handle daemon, a DNS responder answered by a plug-in, the plug-ins of a\n"
               "directory (some isolated in processes of their own), and caps points for\n"
               "uipcctl, on one event loop, until SIGTERM or SIGINT (which drain work in flight).\n"
               "SIGHUP reloads the configuration file and the plug-ins that changed.\n"
               "  --config FILE    the configuration (uipcd --print-config prints every key)\n"
               "  --set K=V        one key, over the file's value (e.g. --set dns.enabled=false)\n"
               "  --listen         = --set dns.listen=ADDR:PORT\n"
               "  --plugins        = --set plugins.directory=DIR\n"
               "  --zone           = --set dns.zone=FILE\n"
               "  --metrics        = --set metrics.listen=ADDR:PORT (loopback only)\n"
               "  --threads        = --set server.threads=N\n"
               "  --dir DIR        = --set caps.directory=DIR --set handles.directory=DIR\n"
               "                     (a private world for tests and demos)\n"
               "  --print-config   print the configuration these options give, and exit\n"
               "Prints one line per module it serves, then \"uipcd: serving\".\n"
               "Exit status: 0 stopped by a signal; 1 a module could not start (a port or point\n"
               "taken, a handle daemon already serving); 2 a bad configuration; 64 usage.\n");
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  // Before any thread or plug-in process: see uipc::adopt_passed_sockets().
  uipc::adopt_passed_sockets();
  // Every client holds descriptors here: the soft limit of 1024 is not ours to keep.
  (void)uipc::raise_descriptor_limit();
  uipcd::config_source source;
  bool print = false;
  const std::pair<std::string_view, const char*> shorthands[] = {
      {"--listen", "dns.listen"},      {"--plugins", "plugins.directory"}, {"--zone", "dns.zone"},
      {"--metrics", "metrics.listen"}, {"--threads", "server.threads"},
  };
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    const bool has_value = i + 1 < argc;
    if (arg == "--help" || arg == "-h") return usage(uipcd::exit_ok);
    if (arg == "--print-config") {
      print = true;
      continue;
    }
    if (!has_value) return usage(uipcd::exit_usage);
    const std::string value = argv[++i];
    if (arg == "--config") {
      source.path = value;
    } else if (arg == "--set") {
      const auto equals = value.find('=');
      if (equals == std::string::npos) return usage(uipcd::exit_usage);
      source.overrides.emplace_back(value.substr(0, equals), value.substr(equals + 1));
    } else if (arg == "--dir") {
      source.overrides.emplace_back("caps.directory", value);
      source.overrides.emplace_back("handles.directory", value);
    } else {
      bool known = false;
      for (const auto& [flag, key] : shorthands) {
        if (arg != flag) continue;
        source.overrides.emplace_back(key, value);
        known = true;
      }
      if (!known) return usage(uipcd::exit_usage);
    }
  }

  uipcd::config c;
  if (auto why = uipcd::load_config(source, c); !why.empty()) {
    std::fprintf(stderr, "uipcd: bad configuration: %s\n", why.c_str());
    return uipcd::exit_bad_config;
  }
  if (print) {
    std::fputs(uipcd::print(c).c_str(), stdout);
    return uipcd::exit_ok;
  }
  uipcd::server s(std::move(c), std::move(source));
  if (int status = s.start(); status != uipcd::exit_ok) return status;
  return s.run();
}
