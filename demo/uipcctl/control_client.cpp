// Asking a control point: see control_client.hpp.
#include "control_client.hpp"

#include <unistd.h>

#include <algorithm>
#include <boost/asio/io_context.hpp>
#include <cstdio>
#include <vector>

#include "commands.hpp"
#include "uipc/caps/client.hpp"

namespace uipcctl {

namespace {
using clock = std::chrono::steady_clock;
}  // namespace

// Prints TAB-separated rows as columns; the last column is not padded.
void print_table(std::string_view body) {
  std::vector<std::vector<std::string_view>> rows;
  std::vector<std::size_t> widths;
  while (!body.empty()) {
    const auto eol = body.find('\n');
    std::string_view line = body.substr(0, eol);
    body = eol == std::string_view::npos ? std::string_view() : body.substr(eol + 1);
    auto& row = rows.emplace_back();
    for (;;) {
      const auto tab = line.find('\t');
      row.push_back(line.substr(0, tab));
      if (widths.size() < row.size()) widths.push_back(0);
      widths[row.size() - 1] = std::max(widths[row.size() - 1], row.back().size());
      if (tab == std::string_view::npos) break;
      line = line.substr(tab + 1);
    }
  }
  for (const auto& row : rows) {
    std::string out;
    for (std::size_t i = 0; i < row.size(); ++i) {
      out += row[i];
      if (i + 1 < row.size()) out.append(widths[i] - row[i].size() + 2, ' ');
    }
    std::puts(out.c_str());
  }
}

// Sends one control request. On success returns true and the body in `body`;
// on failure prints the reason and returns false.
bool ask(const char* command, const control_target& t, const std::string& request,
         std::string& body) {
  boost::asio::io_context io;
  uipc::caps::client_options options;
  options.handshake_timeout = t.timeout;
  auto c = uipc::caps::client::connect(io, t.address, options);
  // Why the host could not be asked; `what` names the step that failed.
  auto fail = [&](const char* what, uipc::error_code ec) {
    if (ec == uipc::condition::timed_out)
      std::fprintf(stderr, "uipcctl %s: the %s at %s did not answer within %lld ms\n", command,
                   t.server, t.address.name.c_str(), static_cast<long long>(t.timeout.count()));
    else
      std::fprintf(stderr, "uipcctl %s: %s%s: %s\n", command, what, t.address.name.c_str(),
                   ec.message().c_str());
    return false;
  };
  if (!c) return fail((std::string("no ") + t.server + " at ").c_str(), c.error());
  auto r = (*c)->call(request, clock::now() + t.timeout);
  if (!r) return fail("", r.error());
  const std::string reply = r->copy();
  if (reply.rfind("ok\n", 0) == 0) {
    body = reply.substr(3);
    return true;
  }
  std::string_view reason = reply;
  if (reason.rfind("error\t", 0) == 0) {
    reason.remove_prefix(6);
    if (!reason.empty() && reason.back() == '\n') reason.remove_suffix(1);
  } else {
    reason = "the host's answer is not the control protocol";
  }
  std::fprintf(stderr, "uipcctl %s: %.*s\n", command, static_cast<int>(reason.size()),
               reason.data());
  return false;
}

// Parses [--point NAME] [--dir DIR] [--timeout MS]; returns the index of the action, or -1.
option_result take_target_option(std::span<char* const> args, std::size_t& i, control_target& t) {
  const std::string_view option = args[i];
  if (option != "--point" && option != "--dir" && option != "--timeout")
    return option_result::other;
  if (i + 1 >= args.size()) return option_result::bad;
  const std::string_view value = args[i + 1];
  if (option == "--point") {
    t.address.name = value;
  } else if (option == "--dir") {
    t.address.directory = value;
  } else {
    const auto ms = number<long>(value);
    if (!ms || *ms < 0) return option_result::bad;
    t.timeout = std::chrono::milliseconds(*ms);
  }
  i += 2;
  return option_result::taken;
}

bool split_target(std::span<char* const> args, control_target& t, std::string_view default_point,
                  std::vector<std::string_view>& rest) {
  t.address.name = std::string(default_point);
  t.address.uid = ::geteuid();
  std::size_t i = 0;
  while (i < args.size()) {
    const auto r = take_target_option(args, i, t);
    if (r == option_result::bad) return false;
    if (r == option_result::other) rest.push_back(args[i++]);
  }
  return true;
}

}  // namespace uipcctl
