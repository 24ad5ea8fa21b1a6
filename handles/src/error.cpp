// The "uipc.handles" error category.
#include "uipc/handles/error.hpp"

#include <string>

namespace uipc::handles {
namespace {

class handles_category_impl final : public boost::system::error_category {
 public:
  const char* name() const noexcept override { return "uipc.handles"; }

  std::string message(int value) const override {
    switch (static_cast<errc>(value)) {
      case errc::invalid_handle:
        return "handle is out of the table's range";
      case errc::stale_handle:
        return "handle was closed (its slot may have been reused)";
      case errc::wrong_type:
        return "handle names an object of another type";
      case errc::not_held:
        return "client holds no reference to this handle";
      case errc::name_too_long:
        return "object name is longer than 63 bytes";
      case errc::name_in_use:
        return "name belongs to an object of another type";
      case errc::name_not_found:
        return "no object has this name";
      case errc::table_full:
        return "handle table is full";
      case errc::scratch_exhausted:
        return "no scratch block of this size is free";
      case errc::bad_scratch_offset:
        return "offset is not a scratch block held by this client";
      case errc::bad_request:
        return "request does not decode or has invalid fields";
      case errc::unknown_request:
        return "unknown request type";
      case errc::not_owner:
        return "mutex is not owned by the calling thread";
      case errc::semaphore_limit:
        return "release would raise the semaphore above its maximum";
      case errc::invalid_argument:
        return "invalid argument";
      case errc::daemon_unavailable:
        return "no handle daemon serves and none could be started";
      case errc::daemon_failed_to_start:
        return "handle daemon died at startup";
      case errc::daemon_start_timeout:
        return "handle daemon did not start in time";
      case errc::daemon_lost:
        return "handle daemon went away";
      case errc::permission_denied:
        return "peer runs as another user";
      case errc::daemon_timeout:
        return "handle daemon did not answer in time";
      case errc::reply_too_large:
        return "handle daemon's reply would exceed its frame limit";
      case errc::forked_copy:
        return "client inherited through fork(): connect a new one in this process";
    }
    return "unknown uipc.handles error " + std::to_string(value);
  }
};

}  // namespace

const boost::system::error_category& handles_category() noexcept {
  static const handles_category_impl instance;
  return instance;
}

}  // namespace uipc::handles
