// Command-line helpers shared by the DNS programs.
#pragma once

#include <charconv>
#include <optional>
#include <string>
#include <string_view>

#include "uipc/dispatch/dispatcher.hpp"

namespace uipc::dns {

/// "1.2.3.4:53" or "[::1]:53".
inline std::optional<dispatch::udp::endpoint> parse_endpoint(std::string_view text) {
  std::string_view host;
  std::string_view port;
  if (!text.empty() && text.front() == '[') {
    const auto close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':')
      return std::nullopt;
    host = text.substr(1, close - 1);
    port = text.substr(close + 2);
  } else {
    const auto colon = text.rfind(':');
    if (colon == std::string_view::npos) return std::nullopt;
    host = text.substr(0, colon);
    port = text.substr(colon + 1);
  }
  unsigned p = 0;
  auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), p);
  if (ec != std::errc() || end != port.data() + port.size() || p > 65535) return std::nullopt;
  boost::system::error_code aec;
  auto address = boost::asio::ip::make_address(std::string(host), aec);
  if (aec) return std::nullopt;
  return dispatch::udp::endpoint(address, static_cast<unsigned short>(p));
}

/// A non-negative integer argument.
inline std::optional<unsigned long> parse_count(std::string_view text) {
  unsigned long v = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || end != text.data() + text.size()) return std::nullopt;
  return v;
}

}  // namespace uipc::dns
