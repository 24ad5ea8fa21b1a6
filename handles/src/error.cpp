// The "uipc.handles" error category.
#include "uipc/handles/error.hpp"

#include "uipc/core/error_category.hpp"

namespace uipc::handles {
namespace {

using generic = boost::system::errc::errc_t;

constexpr error_description descriptions[] = {
    {errc::invalid_handle, "handle is out of the table's range"},
    {errc::stale_handle, "handle was closed (its slot may have been reused)"},
    {errc::wrong_type, "handle names an object of another type"},
    {errc::not_held, "client holds no reference to this handle"},
    {errc::name_too_long, "object name is longer than 63 bytes"},
    {errc::name_in_use, "name belongs to an object of another type"},
    {errc::name_not_found, "no object has this name", condition::not_found},
    {errc::table_full, "handle table is full", condition::no_buffers},
    {errc::scratch_exhausted, "no scratch block of this size is free", condition::no_buffers},
    {errc::bad_scratch_offset, "offset is not a scratch block held by this client"},
    {errc::bad_request, "request does not decode or has invalid fields",
     condition::protocol_violation},
    {errc::unknown_request, "unknown request type", condition::unimplemented},
    {errc::not_owner, "mutex is not owned by the calling thread"},
    {errc::semaphore_limit, "release would raise the semaphore above its maximum"},
    {errc::invalid_argument, "invalid argument", std::nullopt, generic::invalid_argument},
    {errc::daemon_unavailable, "no handle daemon serves and none could be started",
     condition::disconnected},
    {errc::daemon_failed_to_start, "handle daemon died at startup"},
    {errc::daemon_start_timeout, "handle daemon did not start in time", condition::timed_out},
    {errc::daemon_lost, "handle daemon went away", condition::disconnected},
    {errc::permission_denied, "peer runs as another user", condition::permission_denied},
    {errc::daemon_timeout, "handle daemon did not answer in time", condition::timed_out,
     generic::timed_out},
    {errc::reply_too_large, "handle daemon's reply would exceed its frame limit"},
    {errc::forked_copy, "client inherited through fork(): connect a new one in this process"},
    {errc::incompatible_daemon,
     "the handle daemon serving here is another build (segment layout): stop it and connect "
     "again"},
    {errc::too_many_references, "the object has as many references as the daemon allows"},
    {errc::already_greeted, "this connection said hello already"},
    {errc::object_locked,
     "another process holds the object's lock (stopped, or writing the shared segment)",
     condition::timed_out},
};

constexpr module_category category("uipc.handles", descriptions);

}  // namespace

const boost::system::error_category& handles_category() noexcept { return category; }

}  // namespace uipc::handles
