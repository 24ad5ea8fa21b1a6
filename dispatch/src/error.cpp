// The "uipc.dispatch" error category.
#include "uipc/dispatch/error.hpp"

#include <string>

namespace uipc::dispatch {
namespace {

class dispatch_category_impl final : public boost::system::error_category {
 public:
  const char* name() const noexcept override { return "uipc.dispatch"; }

  std::string message(int value) const override {
    switch (static_cast<errc>(value)) {
      case errc::shutting_down:
        return "dispatcher is shutting down";
      case errc::no_free_id:
        return "no free message ID towards this peer";
      case errc::timed_out:
        return "no reply came in time";
      case errc::no_buffers:
        return "receive buffers ran out; queries are being dropped";
      case errc::message_too_large:
        return "message larger than a buffer";
      case errc::bad_options:
        return "dispatcher options out of range";
      case errc::detached:
        return "response or listener is detached";
    }
    return "unknown uipc.dispatch error " + std::to_string(value);
  }
};

}  // namespace

const boost::system::error_category& dispatch_category() noexcept {
  static const dispatch_category_impl instance;
  return instance;
}

}  // namespace uipc::dispatch
