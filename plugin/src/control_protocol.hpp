// The control protocol's answers, apart from the caps point that carries them
// (control.cpp), so that a fuzz target can drive them directly.
#pragma once

#include <chrono>
#include <string>
#include <string_view>

namespace uipc::plugin {
class host;
}

namespace uipc::plugin::detail {

/// The reply to one control request (control.hpp has the protocol): "ok\n"
/// and the body, or "error\t<reason>\n". Any bytes are a request: what is
/// not one of the verbs gets an error and changes nothing.
std::string control_answer(host& h, std::string_view request, std::chrono::milliseconds call_timeout);

}  // namespace uipc::plugin::detail
