// uipcd's configuration keys: one table says each key's section, name, what it
// does, how it is read and printed, and whether a reload can change it.
#include "config.hpp"

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <sstream>

namespace uipcd {

namespace {

struct key {
  const char* section;
  const char* name;
  const char* doc;
  bool reloadable;
  std::function<std::string(config&, std::string_view)> set;  // "" or why refused
  std::function<std::string(const config&)> get;
};

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\r'))
    s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r'))
    s.remove_suffix(1);
  return s;
}

template <class Int>
key number(const char* section, const char* name, const char* doc, bool reloadable,
           Int config::*field, Int low, Int high) {
  return {section,
          name,
          doc,
          reloadable,
          [=](config& c, std::string_view v) -> std::string {
            Int value{};
            auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), value);
            if (ec != std::errc() || end != v.data() + v.size() || value < low || value > high)
              return "'" + std::string(v) + "' is not a whole number from " + std::to_string(low) +
                     " to " + std::to_string(high);
            c.*field = value;
            return {};
          },
          [=](const config& c) { return std::to_string(c.*field); }};
}

key milliseconds(const char* section, const char* name, const char* doc, bool reloadable,
                 std::chrono::milliseconds config::*field, long long low, long long high) {
  return {section,
          name,
          doc,
          reloadable,
          [=](config& c, std::string_view v) -> std::string {
            long long value = 0;
            auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), value);
            if (ec != std::errc() || end != v.data() + v.size() || value < low || value > high)
              return "'" + std::string(v) + "' is not a whole number of milliseconds from " +
                     std::to_string(low) + " to " + std::to_string(high);
            c.*field = std::chrono::milliseconds(value);
            return {};
          },
          [=](const config& c) { return std::to_string((c.*field).count()); }};
}

key boolean(const char* section, const char* name, const char* doc, bool config::*field) {
  return {section,
          name,
          doc,
          false,
          [=](config& c, std::string_view v) -> std::string {
            if (v == "true" || v == "yes" || v == "on") {
              c.*field = true;
            } else if (v == "false" || v == "no" || v == "off") {
              c.*field = false;
            } else {
              return "'" + std::string(v) + "' is not true or false";
            }
            return {};
          },
          [=](const config& c) { return std::string(c.*field ? "true" : "false"); }};
}

// A text value; `check` says why a value is refused ("" when it is fine).
key text(const char* section, const char* name, const char* doc, bool reloadable,
         std::string config::*field, std::function<std::string(std::string_view)> check = {}) {
  return {section,
          name,
          doc,
          reloadable,
          [=](config& c, std::string_view v) -> std::string {
            if (check) {
              if (auto why = check(v); !why.empty()) return why;
            }
            c.*field = std::string(v);
            return {};
          },
          [=](const config& c) { return c.*field; }};
}

std::string address_with_port(std::string_view v, bool loopback_only) {
  // ADDR:PORT or [ADDR]:PORT; the address itself is checked when it is bound.
  const auto colon = v.rfind(':');
  if (colon == std::string_view::npos || colon == 0)
    return "'" + std::string(v) + "' is not ADDRESS:PORT";
  unsigned port = 0;
  const auto p = v.substr(colon + 1);
  auto [end, ec] = std::from_chars(p.data(), p.data() + p.size(), port);
  if (ec != std::errc() || end != p.data() + p.size() || port > 65535)
    return "'" + std::string(v) + "' has no port from 0 to 65535";
  if (loopback_only) {
    const auto host = v.substr(0, colon);
    if (host != "127.0.0.1" && host != "[::1]" && host != "localhost")
      return "'" + std::string(v) + "' is not on loopback (127.0.0.1 or [::1])";
  }
  return {};
}

std::string no_separator(std::string_view v) {
  if (v.find_first_of("\n\t") != std::string_view::npos)
    return "the value holds a TAB or a line break";
  return {};
}

const std::vector<key>& keys() {
  static const std::vector<key> table = {
      number<unsigned>("server", "threads", "event-loop threads every module shares", false,
                       &config::threads, 1, 64),
      milliseconds("server", "drain_ms",
                   "on SIGTERM, the longest wait for queries and calls in flight", true,
                   &config::drain, 0, 600000),

      boolean("handles", "enabled",
              "serve as the handle daemon (clients find it as they find uipc-handled)",
              &config::handles),
      text("handles", "directory", "the daemon's private directory; empty: as uipc-handled", false,
           &config::handles_directory, no_separator),
      text("handles", "name", "the daemon instance's name (socket uipc-NAME.sock)", false,
           &config::handles_name, no_separator),
      number<std::uint32_t>("handles", "capacity", "slots of the handle table", false,
                            &config::handles_capacity, 2, 1u << 20),
      number<std::uint64_t>("handles", "scratch_bytes", "bytes of the scratch area", false,
                            &config::handles_scratch, 4096, std::uint64_t{1} << 32),

      boolean("dns", "enabled", "serve DNS over UDP, answered by a plug-in service", &config::dns),
      text("dns", "listen", "address and port (port 0: any free one, printed at start)", false,
           &config::dns_listen, [](std::string_view v) { return address_with_port(v, false); }),
      text("dns", "service",
           "the plug-in service answering each query (bytes: query in, answer out)", true,
           &config::dns_service, no_separator),
      text("dns", "zone",
           "the zone file the dns_zone plug-in serves; empty: its built-in zone (uipc.test)", true,
           &config::dns_zone, no_separator),
      number<std::uint32_t>("dns", "buffers",
                            "receive buffers of the dispatcher (queries held at once)", false,
                            &config::dns_buffers, 16, 1u << 20),
      milliseconds("dns", "timeout_ms",
                   "a query's deadline inside the plug-in; past it the answer is SERVFAIL", true,
                   &config::dns_timeout, 1, 60000),

      text("plugins", "directory",
           "every *.so here is loaded at start and at SIGHUP; empty: the example plug-ins beside "
           "uipcd",
           true, &config::plugins_directory, no_separator),
      {"plugins", "isolate",
       "plug-ins (file names without .so, comma-separated) run each in a process of its own", true,
       [](config& c, std::string_view v) -> std::string {
         std::vector<std::string> names;
         while (!v.empty()) {
           const auto comma = v.find(',');
           const auto name = trim(v.substr(0, comma));
           if (name.empty() || name.find_first_of("/\t\n") != std::string_view::npos)
             return "'" + std::string(name) + "' is not a plug-in file name";
           names.emplace_back(name);
           v = comma == std::string_view::npos ? std::string_view() : v.substr(comma + 1);
         }
         c.isolate = std::move(names);
         return {};
       },
       [](const config& c) {
         std::string out;
         for (const auto& n : c.isolate) out += (out.empty() ? "" : ",") + n;
         return out;
       }},

      text("caps", "directory",
           "where caps points live; empty: $UIPC_SHARED_DIR, else /tmp/uipc-shared", false,
           &config::caps_directory, no_separator),
      text("caps", "control", "the point uipcctl status, stats and reload talk to", false,
           &config::control_point, no_separator),
      text("caps", "plugins", "the plug-in host's point (uipcctl plugins, services); empty: none",
           false, &config::plugins_point, no_separator),
      text("caps", "echo", "a point answering each request with its own bytes; empty: none", false,
           &config::echo_point, no_separator),

      text("metrics", "listen",
           "Prometheus text at http://ADDRESS:PORT/metrics, loopback only; empty: off", false,
           &config::metrics,
           [](std::string_view v) {
             return v.empty() ? std::string() : address_with_port(v, true);
           }),
  };
  return table;
}

const key* find(std::string_view section, std::string_view name) {
  for (const auto& k : keys())
    if (k.section == section && k.name == name) return &k;
  return nullptr;
}

}  // namespace

std::string set(config& c, std::string_view dotted, std::string_view value) {
  const auto dot = dotted.find('.');
  const key* k =
      dot == std::string_view::npos ? nullptr : find(dotted.substr(0, dot), dotted.substr(dot + 1));
  if (k == nullptr) return "unknown key " + std::string(dotted);
  return k->set(c, trim(value));
}

std::string apply_text(config& c, std::string_view text) {
  config next = c;
  std::string section;
  std::size_t line_number = 0;
  while (!text.empty()) {
    ++line_number;
    const auto eol = text.find('\n');
    std::string_view line = text.substr(0, eol);
    text = eol == std::string_view::npos ? std::string_view() : text.substr(eol + 1);
    if (const auto hash = line.find('#'); hash != std::string_view::npos)
      line = line.substr(0, hash);
    line = trim(line);
    if (line.empty()) continue;
    const auto at = "line " + std::to_string(line_number) + ": ";
    if (line.front() == '[') {
      if (line.back() != ']') return at + "a section line is [NAME]";
      section = trim(line.substr(1, line.size() - 2));
      if (std::none_of(keys().begin(), keys().end(),
                       [&](const key& k) { return k.section == section; }))
        return at + "unknown section [" + section + "]";
      continue;
    }
    const auto equals = line.find('=');
    if (equals == std::string_view::npos) return at + "expected KEY = VALUE";
    if (section.empty()) return at + "a key before any [section]";
    const auto name = trim(line.substr(0, equals));
    const key* k = find(section, name);
    if (k == nullptr) return at + "unknown key " + std::string(name) + " in [" + section + "]";
    if (auto why = k->set(next, trim(line.substr(equals + 1))); !why.empty())
      return at + section + "." + std::string(name) + ": " + why;
  }
  c = std::move(next);
  return {};
}

std::string apply_file(config& c, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return path + ": " + std::strerror(errno);
  std::ostringstream text;
  text << in.rdbuf();
  if (auto why = apply_text(c, text.str()); !why.empty()) return path + ": " + why;
  return {};
}

std::string print(const config& c) {
  std::string out =
      "# uipcd configuration (uipcd --config FILE). Every key is shown with its\n"
      "# value; '(reload)' marks keys that SIGHUP applies, the rest need a restart.\n";
  std::string section;
  for (const auto& k : keys()) {
    if (section != k.section) {
      section = k.section;
      out += "\n[" + section + "]\n";
    }
    out += std::string("# ") + k.doc + (k.reloadable ? " (reload)" : "") + "\n";
    out += std::string(k.name) + " = " + k.get(c) + "\n";
  }
  return out;
}

std::vector<std::string> needs_restart(const config& before, const config& after) {
  std::vector<std::string> out;
  for (const auto& k : keys())
    if (!k.reloadable && k.get(before) != k.get(after))
      out.push_back(std::string(k.section) + "." + k.name);
  return out;
}

}  // namespace uipcd

namespace uipcd {

std::vector<std::string> adopt_reloadable(config& running, const config& next) {
  for (const auto& k : keys())
    if (k.reloadable)
      (void)k.set(running, k.get(next));  // a value printed by get() always reads back
  return needs_restart(running, next);
}

}  // namespace uipcd
