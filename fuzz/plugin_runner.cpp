// Fuzz target: what the plug-in host reads from an isolated plug-in's runner
// (its list of services and its call replies). The input is one reply as
// the runner's channel holds it, read both ways: as the answer to `list` and
// as the answer to `call`. Checked beyond "no
// crash": a listing accepted names a plug-in and its services by the rules,
// each service once and at most max_listed_services of them; a call reply accepted has a status of
// the ABI and exactly the bytes after its header.
#include <cstdint>
#include <cstring>
#include <set>
#include <span>
#include <string_view>

#include "fuzz_support.hpp"
#include "runner_protocol.hpp"

namespace proto = uipc::plugin::detail::runner_protocol;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  if (auto listing = proto::parse_listing(text)) {
    UIPC_FUZZ_CHECK(!listing->plugin.empty() && listing->plugin.size() <= proto::max_name);
    UIPC_FUZZ_CHECK(listing->plugin.find_first_of("\t\n/ ") == std::string_view::npos);
    // Services by the host's rules, each once, and bounded in number: a
    // listing costs the host a registry slot per name.
    UIPC_FUZZ_CHECK(listing->services.size() <= proto::max_listed_services);
    std::set<std::string_view> seen;
    for (const auto& [name, flags] : listing->services) {
      UIPC_FUZZ_CHECK(uipc::plugin::detail::valid_service_name(name));
      UIPC_FUZZ_CHECK(seen.insert(name).second);
    }
  }
  const auto bytes = std::as_bytes(std::span(data, size));
  if (auto reply = proto::parse_reply(bytes)) {
    UIPC_FUZZ_CHECK(reply->status >= UIPC_PLUGIN_OK && reply->status <= UIPC_PLUGIN_E_TOO_MANY);
    UIPC_FUZZ_CHECK(reply->bytes.size() == size - proto::reply_header);
    UIPC_FUZZ_CHECK(reply->bytes.data() == bytes.data() + proto::reply_header);
  } else if (size >= proto::reply_header) {
    std::int32_t status;
    std::memcpy(&status, data, 4);
    UIPC_FUZZ_CHECK(status < UIPC_PLUGIN_OK ||
                    status > UIPC_PLUGIN_E_TOO_MANY);  // the only reason to refuse
  }
  return 0;
}
