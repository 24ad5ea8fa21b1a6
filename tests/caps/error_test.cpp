// The "uipc.caps" category: every code compares equal to the portable
// condition it means and to no other, also as decoded from the wire.
#include "uipc/caps/error.hpp"

#include <gtest/gtest.h>

#include <optional>
#include <utility>
#include <vector>

#include "core/error_support.hpp"

namespace uipc::caps {
namespace {

using test::expect_only;

const std::vector<std::pair<errc, std::optional<condition>>> caps_codes = {
    {errc::name_taken, std::nullopt},
    {errc::not_registered, condition::not_found},
    {errc::buffer_too_small, std::nullopt},
    {errc::message_too_large, std::nullopt},
    {errc::no_buffers, condition::no_buffers},
    {errc::unknown_message, std::nullopt},
    {errc::withdrawn, condition::shutting_down},
    {errc::protocol_violation, condition::protocol_violation},
    {errc::disconnected, condition::disconnected},
    {errc::forked_copy, std::nullopt},
    {errc::wrong_gid, std::nullopt},
    {errc::timed_out, condition::timed_out},
    {errc::stopped, condition::shutting_down},
};

TEST(CapsErrorTest, EveryCodeHasAReadableMessageAndComparesEqualToItsConditionOnly) {
  ASSERT_EQ(caps_codes.size(), static_cast<std::size_t>(errc::stopped));
  int value = 1;
  for (const auto& [e, expected] : caps_codes) {
    const error_code code = make_error_code(e);
    EXPECT_EQ(code.value(), value++) << "caps_codes must list every enumerator in order";
    EXPECT_STREQ(code.category().name(), "uipc.caps");
    EXPECT_EQ(code.message().find("unknown uipc.caps"), std::string::npos) << code.message();
    expect_only(code, expected);
  }
  EXPECT_TRUE(make_error_code(errc::timed_out) == boost::system::errc::timed_out);
}

TEST(CapsErrorTest, CodeDecodedFromTheWireKeepsItsCondition) {
  for (const auto& [e, expected] : caps_codes) {
    const error_code got = test::through_the_wire(make_error_code(e), {&caps_category()});
    EXPECT_EQ(got, make_error_code(e));
    expect_only(got, expected);
  }
}

}  // namespace
}  // namespace uipc::caps
