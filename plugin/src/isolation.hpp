// What an isolated plug-in's record holds: the supervisor of its process.
#pragma once

namespace uipc::plugin::detail {

/// The part of a plug-in record that runs it in its own process.
struct isolation {
  virtual ~isolation() = default;
};

}  // namespace uipc::plugin::detail
