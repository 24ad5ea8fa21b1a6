// The "uipc.caps" error category.
#include "uipc/caps/error.hpp"

#include "uipc/core/error_category.hpp"

namespace uipc::caps {
namespace {

using generic = boost::system::errc::errc_t;

constexpr error_description descriptions[] = {
    {errc::name_taken, "a live server holds this name"},
    {errc::not_registered, "no live server serves this point", condition::not_found},
    {errc::buffer_too_small, "message is larger than the buffer; it stays queued"},
    {errc::message_too_large, "message is larger than the channel's payload arena"},
    {errc::no_buffers, "too many messages in flight, or the ring or arena is full",
     condition::no_buffers},
    {errc::unknown_message, "no message with this id awaits a reply"},
    {errc::withdrawn, "message was withdrawn by its client", condition::shutting_down},
    {errc::protocol_violation, "peer broke the channel protocol", condition::protocol_violation},
    {errc::disconnected, "peer went away", condition::disconnected},
    {errc::forked_copy, "object inherited through fork(): make a new one in this process"},
    {errc::wrong_gid, "point belongs to another group than the one asked for"},
    {errc::timed_out, "no reply before the deadline", condition::timed_out, generic::timed_out},
    {errc::stopped, "service or client was stopped", condition::shutting_down},
};

constexpr module_category category("uipc.caps", descriptions);

}  // namespace

const boost::system::error_category& caps_category() noexcept { return category; }

}  // namespace uipc::caps
