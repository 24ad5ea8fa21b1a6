// The "uipc.handles" category: every code compares equal to the portable
// condition it means and to no other, also as a client decodes it from a reply.
#include "uipc/handles/error.hpp"

#include <gtest/gtest.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/error_support.hpp"

namespace uipc::handles {
namespace {

using test::expect_only;

// Every enumerator, in order, with the condition it means.
const std::vector<std::pair<errc, std::optional<condition>>> handles_codes = {
    {errc::invalid_handle, std::nullopt},
    {errc::stale_handle, std::nullopt},
    {errc::wrong_type, std::nullopt},
    {errc::not_held, std::nullopt},
    {errc::name_too_long, std::nullopt},
    {errc::name_in_use, std::nullopt},
    {errc::name_not_found, condition::not_found},
    {errc::table_full, condition::no_buffers},
    {errc::scratch_exhausted, condition::no_buffers},
    {errc::bad_scratch_offset, std::nullopt},
    {errc::bad_request, condition::protocol_violation},
    {errc::unknown_request, condition::unimplemented},
    {errc::not_owner, std::nullopt},
    {errc::semaphore_limit, std::nullopt},
    {errc::invalid_argument, std::nullopt},
    {errc::daemon_unavailable, condition::disconnected},
    {errc::daemon_failed_to_start, std::nullopt},
    {errc::daemon_start_timeout, condition::timed_out},
    {errc::daemon_lost, condition::disconnected},
    {errc::permission_denied, condition::permission_denied},
    {errc::daemon_timeout, condition::timed_out},
    {errc::reply_too_large, std::nullopt},
    {errc::forked_copy, std::nullopt},
};

TEST(HandlesErrorTest, EveryCodeHasAReadableMessageAndComparesEqualToItsConditionOnly) {
  ASSERT_EQ(handles_codes.size(), static_cast<std::size_t>(errc::forked_copy));
  int value = 1;
  for (const auto& [e, expected] : handles_codes) {
    const error_code code = make_error_code(e);
    EXPECT_EQ(code.value(), value++) << "handles_codes must list every enumerator in order";
    EXPECT_STREQ(code.category().name(), "uipc.handles");
    EXPECT_FALSE(code.message().empty());
    EXPECT_EQ(code.message().find("unknown uipc.handles"), std::string::npos) << code.message();
    expect_only(code, expected);
  }
}

TEST(HandlesErrorTest, ObviousGenericConditionsHold) {
  EXPECT_TRUE(make_error_code(errc::daemon_timeout) == boost::system::errc::timed_out);
  EXPECT_TRUE(make_error_code(errc::invalid_argument) == boost::system::errc::invalid_argument);
  EXPECT_FALSE(make_error_code(errc::daemon_lost) == boost::system::errc::timed_out);
}

TEST(HandlesErrorTest, TimeoutsOfEveryLayerMeetInOneCondition) {
  EXPECT_EQ(make_error_code(errc::daemon_timeout), condition::timed_out);
  EXPECT_EQ(make_error_code(uipc::errc::timed_out), condition::timed_out);
  EXPECT_EQ(error_code(ETIMEDOUT, boost::system::system_category()), condition::timed_out);
  // ...and remain distinct codes.
  EXPECT_NE(make_error_code(errc::daemon_timeout), make_error_code(uipc::errc::timed_out));
}

TEST(HandlesErrorTest, CodeDecodedFromTheWireKeepsItsCondition) {
  const auto fds = test::open_fd_count();
  for (const auto& [e, expected] : handles_codes) {
    // Known to the receiver, as the client knows it (connect.cpp).
    const error_code got = test::through_the_wire(make_error_code(e), {&handles_category()});
    EXPECT_EQ(got, make_error_code(e));
    expect_only(got, expected);
  }
  // Not known: remote_error, no condition.
  const error_code unknown = test::through_the_wire(make_error_code(errc::daemon_timeout));
  EXPECT_EQ(unknown, make_error_code(uipc::errc::remote_error));
  expect_only(unknown, std::nullopt);
  EXPECT_EQ(test::open_fd_count(), fds);
}

}  // namespace
}  // namespace uipc::handles
