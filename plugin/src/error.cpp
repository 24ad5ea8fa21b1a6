// The "uipc.plugin" category, and the texts the C ABI's status_text gives.
#include "uipc/plugin/error.hpp"

#include "uipc/core/error_category.hpp"

namespace uipc::plugin {
namespace {

using generic = boost::system::errc::errc_t;

constexpr error_description descriptions[] = {
    {errc::invalid_name, "name breaks the rules (letters, digits, '_' and ' ', 1 to 63 bytes)"},
    {errc::duplicate_service, "another plug-in registered this service name"},
    {errc::service_not_found, "no service of this name", condition::not_found},
    {errc::service_not_compatible,
     "the host cannot bridge this call (a pointer service across processes)"},
    {errc::not_owner, "the service belongs to another plug-in"},
    {errc::wrong_context, "memory given by another context or pool"},
    {errc::double_free, "block already freed"},
    {errc::memory_limit, "the request's memory limit is reached", condition::no_buffers},
    {errc::no_memory, "out of memory", condition::no_buffers, generic::not_enough_memory},
    {errc::context_busy, "another thread is using this context"},
    {errc::invalid_argument, "invalid argument", std::nullopt, generic::invalid_argument},
    {errc::timed_out, "the call's deadline passed", condition::timed_out, generic::timed_out},
    {errc::plugin_failed, "the plug-in threw, crashed or returned garbage"},
    {errc::abi_mismatch, "plug-in ABI is another major version, or a struct is truncated"},
    {errc::no_entry_point, "shared object exports no uipc_plugin_entry"},
    {errc::init_failed, "plug-in init refused"},
    {errc::load_failed, "shared object did not load"},
    {errc::duplicate_plugin, "a plug-in of this name is loaded"},
    {errc::plugin_not_found, "no plug-in of this name is loaded", condition::not_found},
    {errc::unavailable, "isolated plug-in's process is down", condition::disconnected},
    {errc::stopped, "plug-in host is shutting down", condition::shutting_down},
    {errc::too_many, "the host's limit of services or contexts is reached", condition::no_buffers},
};

constexpr module_category category("uipc.plugin", descriptions);

}  // namespace

const boost::system::error_category& plugin_category() noexcept { return category; }

const char* status_text(int status) noexcept {
  if (status == UIPC_PLUGIN_OK) return "ok";
  for (const auto& row : descriptions)
    if (row.value == status) return row.message;
  return "unknown plug-in status";
}

}  // namespace uipc::plugin
