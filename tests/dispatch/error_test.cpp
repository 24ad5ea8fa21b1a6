// The "uipc.dispatch" category: every code compares equal to the portable
// condition it means and to no other, also decoded from a reply; and the buffer
// pool's factory reports running out of memory as an error, never a throw.
#include "uipc/dispatch/error.hpp"

#include <gtest/gtest.h>

#include <boost/asio/io_context.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "alloc_fault.hpp"
#include "core/error_support.hpp"
#include "uipc/core/buffer_pool.hpp"

namespace uipc::dispatch {
namespace {

using test::expect_only;

// Every enumerator, in order, with the condition it means.
const std::vector<std::pair<errc, std::optional<condition>>> dispatch_codes = {
    {errc::shutting_down, condition::shutting_down},
    {errc::no_free_id, condition::no_buffers},
    {errc::timed_out, condition::timed_out},
    {errc::no_buffers, condition::no_buffers},
    {errc::message_too_large, std::nullopt},
    {errc::bad_options, std::nullopt},
    {errc::detached, std::nullopt},
};

TEST(DispatchErrorTest, EveryCodeHasAReadableMessageAndComparesEqualToItsConditionOnly) {
  ASSERT_EQ(dispatch_codes.size(), static_cast<std::size_t>(errc::detached));
  int value = 1;
  for (const auto& [e, expected] : dispatch_codes) {
    const error_code code = make_error_code(e);
    EXPECT_EQ(code.value(), value++) << "dispatch_codes must list every enumerator in order";
    EXPECT_STREQ(code.category().name(), "uipc.dispatch");
    EXPECT_FALSE(code.message().empty());
    EXPECT_EQ(code.message().find("unknown uipc.dispatch"), std::string::npos) << code.message();
    expect_only(code, expected);
  }
}

TEST(DispatchErrorTest, ShutdownAndOverloadMeetTheCoreCodesInOneCondition) {
  EXPECT_EQ(make_error_code(errc::shutting_down), condition::shutting_down);
  EXPECT_EQ(make_error_code(uipc::errc::shutting_down), condition::shutting_down);
  EXPECT_EQ(make_error_code(errc::no_buffers), condition::no_buffers);
  EXPECT_EQ(make_error_code(uipc::errc::pool_exhausted), condition::no_buffers);
  EXPECT_EQ(make_error_code(boost::system::errc::not_enough_memory), condition::no_buffers);
  EXPECT_TRUE(make_error_code(errc::timed_out) == boost::system::errc::timed_out);
  EXPECT_TRUE(make_error_code(errc::bad_options) == boost::system::errc::invalid_argument);
}

TEST(DispatchErrorTest, CodeDecodedFromTheWireKeepsItsCondition) {
  for (const auto& [e, expected] : dispatch_codes) {
    const error_code got = test::through_the_wire(make_error_code(e), {&dispatch_category()});
    EXPECT_EQ(got, make_error_code(e));
    expect_only(got, expected);
  }
}

// Every allocation of buffer_pool::create gets its turn to fail: each failure is
// not_enough_memory, returned, not thrown, and leaks nothing (ASan).
TEST(DispatchErrorTest, BufferPoolThatRunsOutOfMemoryReportsAnError) {
  boost::asio::io_context ctx;
  int failures = 0;
  for (int k = 1; k <= 16; ++k) {
    test::alloc_fail_countdown() = k;
    result<std::unique_ptr<buffer_pool>> r = make_error_code(uipc::errc::remote_error);
    EXPECT_NO_THROW(r = buffer_pool::create(ctx.get_executor(), 512, 8)) << "allocation " << k;
    test::alloc_fail_countdown() = 0;
    if (r) {
      EXPECT_EQ((*r)->capacity(), 8u);
      EXPECT_TRUE((*r)->try_acquire());
      break;
    }
    EXPECT_EQ(r.error(), boost::system::errc::not_enough_memory) << "allocation " << k;
    ++failures;
  }
  EXPECT_GE(failures, 3);  // the slab, the free list, the pool
}

}  // namespace
}  // namespace uipc::dispatch
