// The "uipc.dispatch" error category.
#include "uipc/dispatch/error.hpp"

#include "uipc/core/error_category.hpp"

namespace uipc::dispatch {
namespace {

using generic = boost::system::errc::errc_t;

constexpr error_description descriptions[] = {
    {errc::shutting_down, "dispatcher is shutting down", condition::shutting_down},
    // The IDs towards a peer are a resource like buffers: wait for responses to end, then retry.
    {errc::no_free_id, "no free message ID towards this peer", condition::no_buffers},
    {errc::timed_out, "no reply came in time", condition::timed_out, generic::timed_out},
    {errc::no_buffers, "receive buffers ran out; queries are being dropped", condition::no_buffers},
    {errc::message_too_large, "message larger than a buffer", std::nullopt, generic::message_size},
    {errc::bad_options, "dispatcher options out of range", std::nullopt, generic::invalid_argument},
    {errc::detached, "response or listener is detached"},
    {errc::no_free_port, "no exclusive port free (all exclusive sockets taken, or the range busy)",
     condition::no_buffers},
};

constexpr module_category category("uipc.dispatch", descriptions);

}  // namespace

const boost::system::error_category& dispatch_category() noexcept { return category; }

}  // namespace uipc::dispatch
