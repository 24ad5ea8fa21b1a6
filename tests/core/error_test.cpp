// Portable conditions: core's codes, the system's and Asio's compare equal to
// the condition they mean and to no other, also after a trip over the wire;
// the table-driven module category keeps its promises.
#include "uipc/core/error.hpp"

#include <boost/asio/error.hpp>
#include <cerrno>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/error_support.hpp"
#include "test_support.hpp"
#include "uipc/core/error_category.hpp"

namespace uipc {
namespace {

using test::all_conditions;
using test::expect_only;

// A message a person can read: not empty, not the fallback for a value without a row.
void expect_readable(const error_code& code) {
  const std::string m = code.message();
  EXPECT_FALSE(m.empty()) << code.to_string();
  EXPECT_NE(m.rfind(std::string("unknown ") + code.category().name(), 0), 0u)
      << code.to_string() << ": " << m;
}

// Every core enumerator, in order, with the condition it means.
const std::vector<std::pair<errc, std::optional<condition>>> core_codes = {
    {errc::frame_too_large, condition::protocol_violation},
    {errc::short_frame, condition::disconnected},
    {errc::bad_frame, condition::protocol_violation},
    {errc::peer_closed, condition::disconnected},
    {errc::shutting_down, condition::shutting_down},
    {errc::address_in_use, std::nullopt},
    {errc::not_a_socket, std::nullopt},
    {errc::timed_out, condition::timed_out},
    {errc::too_many_fds, condition::protocol_violation},
    {errc::bad_segment, condition::protocol_violation},
    {errc::pool_exhausted, condition::no_buffers},
    {errc::not_held, std::nullopt},
    {errc::unsafe_directory, condition::permission_denied},
    {errc::remote_error, std::nullopt},
    {errc::bad_request, condition::protocol_violation},
    {errc::unknown_request, condition::unimplemented},
    {errc::permission_denied, condition::permission_denied},
    {errc::bad_reply, condition::protocol_violation},
    {errc::program_not_found, condition::not_found},
    {errc::program_not_executable, std::nullopt},
    {errc::program_exited, std::nullopt},
    {errc::start_timeout, condition::timed_out},
    {errc::invalid_name, std::nullopt},
    {errc::foreign_owner, condition::permission_denied},
    {errc::wrong_server, condition::permission_denied},
};

TEST(ErrorTest, EveryConditionHasANameAndAReadableMessage) {
  EXPECT_STREQ(condition_category().name(), "uipc");
  for (const condition c : all_conditions) {
    const auto cond = make_error_condition(c);
    EXPECT_EQ(&cond.category(), &condition_category());
    EXPECT_TRUE(cond) << "a condition must not read as success";
    expect_readable(error_code(cond.value(), condition_category()));
  }
}

TEST(ErrorTest, EveryCoreCodeComparesEqualToItsConditionAndNoOther) {
  ASSERT_EQ(core_codes.size(), static_cast<std::size_t>(errc::wrong_server));
  int value = 1;
  for (const auto& [e, expected] : core_codes) {
    const error_code code = make_error_code(e);
    EXPECT_EQ(code.value(), value++) << "core_codes must list every enumerator in order";
    EXPECT_STREQ(code.category().name(), "uipc.core");
    expect_readable(code);
    expect_only(code, expected);
  }
  // Past the last enumerator: a readable fallback, and no meaning.
  const error_code beyond(static_cast<int>(errc::wrong_server) + 1, core_category());
  EXPECT_NE(beyond.message().find("unknown"), std::string::npos);
  expect_only(beyond, std::nullopt);
}

TEST(ErrorTest, CoreCodesStillCompareEqualToTheirGenericConditions) {
  namespace generic = boost::system::errc;
  EXPECT_TRUE(make_error_code(errc::timed_out) == generic::timed_out);
  EXPECT_TRUE(make_error_code(errc::peer_closed) == generic::connection_reset);
  EXPECT_TRUE(make_error_code(errc::frame_too_large) == generic::message_size);
  EXPECT_TRUE(make_error_code(errc::address_in_use) == generic::address_in_use);
  EXPECT_TRUE(make_error_code(errc::not_a_socket) == generic::not_a_socket);
  EXPECT_FALSE(make_error_code(errc::shutting_down) == generic::operation_canceled);
  EXPECT_FALSE(make_error_code(errc::start_timeout) == generic::timed_out);
  // And codes still equal themselves only.
  EXPECT_EQ(make_error_code(errc::timed_out), make_error_code(errc::timed_out));
  EXPECT_NE(make_error_code(errc::timed_out), make_error_code(errc::start_timeout));
}

TEST(ErrorTest, SystemAndGenericCodesCompareEqualToTheObviousCondition) {
  const std::vector<std::pair<int, std::optional<condition>>> cases = {
      {EPIPE, condition::disconnected},
      {ECONNRESET, condition::disconnected},
      {ECONNREFUSED, condition::disconnected},
      {ENOTCONN, condition::disconnected},
      {ETIMEDOUT, condition::timed_out},
      {ENOBUFS, condition::no_buffers},
      {ENOMEM, condition::no_buffers},
      {EMFILE, condition::no_buffers},
      {ENFILE, condition::no_buffers},
      {ENOSYS, condition::unimplemented},
      {EOPNOTSUPP, condition::unimplemented},
      {EPROTO, condition::protocol_violation},
      {EBADMSG, condition::protocol_violation},
      {EACCES, condition::permission_denied},
      {EPERM, condition::permission_denied},
      {ENOENT, condition::not_found},
      {ESRCH, condition::not_found},
      // No portable meaning: a caller's mistake, a retry signal, a cancellation.
      {EINVAL, std::nullopt},
      {EBADF, std::nullopt},
      {EAGAIN, std::nullopt},
      {ECANCELED, std::nullopt},
      {EEXIST, std::nullopt},
      {EINTR, std::nullopt},
  };
  for (const auto& [value, expected] : cases) {
    expect_only(error_code(value, boost::system::system_category()), expected);
    expect_only(error_code(value, boost::system::generic_category()), expected);
  }
}

TEST(ErrorTest, AsioCodesCompareEqualToTheObviousCondition) {
  namespace asio_error = boost::asio::error;
  expect_only(asio_error::eof, condition::disconnected);
  expect_only(asio_error::connection_reset, condition::disconnected);
  expect_only(asio_error::broken_pipe, condition::disconnected);
  expect_only(asio_error::connection_aborted, condition::disconnected);
  expect_only(asio_error::timed_out, condition::timed_out);
  expect_only(asio_error::no_buffer_space, condition::no_buffers);
  expect_only(asio_error::access_denied, condition::permission_denied);
  expect_only(asio_error::host_not_found, condition::not_found);
  expect_only(asio_error::service_not_found, condition::not_found);
  // Cancellation is not a failure: it means nothing portable.
  expect_only(asio_error::operation_aborted, std::nullopt);
  expect_only(asio_error::already_open, std::nullopt);
  expect_only(error_code{}, std::nullopt);
}

TEST(ErrorTest, CoreCodeDecodedFromTheWireKeepsItsCondition) {
  const auto fds = test::open_fd_count();
  for (const auto& [e, expected] : core_codes) {
    const error_code got = test::through_the_wire(make_error_code(e));
    EXPECT_EQ(got, make_error_code(e));
    expect_only(got, expected);
  }
  for (const int value : {ETIMEDOUT, EPIPE, ENOENT, EACCES}) {
    const error_code sys(value, boost::system::system_category());
    const error_code gen(value, boost::system::generic_category());
    EXPECT_EQ(test::through_the_wire(sys), sys);
    EXPECT_EQ(test::through_the_wire(gen), gen);
  }
  EXPECT_EQ(test::through_the_wire(boost::asio::error::timed_out), condition::timed_out);
  EXPECT_EQ(test::open_fd_count(), fds);
}

TEST(ErrorTest, CodeOfAnUnknownCategoryFromTheWireHasNoCondition) {
  // A module category this side was not told about: remote_error, which means nothing portable.
  static constexpr error_description rows[] = {
      {errc::frame_too_large, "elsewhere", condition::timed_out}};
  static constexpr module_category elsewhere("uipc.elsewhere", rows);
  const error_code sent(1, elsewhere);
  ASSERT_EQ(sent, condition::timed_out);
  const error_code got = test::through_the_wire(sent);
  EXPECT_EQ(got, make_error_code(errc::remote_error));
  expect_only(got, std::nullopt);
  // Told about it, the receiver gets the code back, condition and all.
  EXPECT_EQ(test::through_the_wire(sent, {&elsewhere}), sent);
  EXPECT_EQ(test::through_the_wire(sent, {&elsewhere}), condition::timed_out);
}

TEST(ErrorTest, WireCannotForgeACancellation) {
  for (const auto* category :
       {&boost::system::system_category(), &boost::system::generic_category()}) {
    const error_code cancelled(ECANCELED, *category);
    EXPECT_EQ(test::through_the_wire(cancelled), make_error_code(errc::remote_error));
  }
}

// --------------------------------------------------------- the module helper

enum class sample_errc { lost = 1, slow, odd };

constexpr error_description sample_rows[] = {
    {sample_errc::lost, "the sample went away", condition::disconnected},
    {sample_errc::slow, "the sample was slow", condition::timed_out,
     boost::system::errc::timed_out},
    {sample_errc::odd, "the sample is odd"},
};
constexpr module_category sample_category("uipc.sample", sample_rows);

TEST(ModuleCategoryTest, RowsGiveNameMessageConditionAndGenericCondition) {
  EXPECT_STREQ(sample_category.name(), "uipc.sample");
  EXPECT_EQ(sample_category.message(1), "the sample went away");
  EXPECT_EQ(sample_category.message(3), "the sample is odd");
  expect_only(error_code(1, sample_category), condition::disconnected);
  expect_only(error_code(2, sample_category), condition::timed_out);
  expect_only(error_code(3, sample_category), std::nullopt);
  EXPECT_EQ(sample_category.portable_condition(2), condition::timed_out);
  EXPECT_EQ(sample_category.portable_condition(3), std::nullopt);
  // The generic condition is the default one; a row without one keeps its own.
  EXPECT_TRUE(error_code(2, sample_category) == boost::system::errc::timed_out);
  EXPECT_EQ(sample_category.default_error_condition(2), boost::system::errc::timed_out);
  EXPECT_EQ(sample_category.default_error_condition(3),
            boost::system::error_condition(3, sample_category));
  EXPECT_FALSE(error_code(1, sample_category) == boost::system::errc::connection_reset);
}

TEST(ModuleCategoryTest, ValueWithoutARowReadsUnknownAndMeansNothing) {
  for (const int value : {0, -1, 4, 1000}) {
    EXPECT_EQ(sample_category.message(value), "unknown uipc.sample error " + std::to_string(value));
    expect_only(error_code(value, sample_category), std::nullopt);
    EXPECT_EQ(sample_category.portable_condition(value), std::nullopt);
  }
}

TEST(ModuleCategoryTest, CategoriesWithTheSameNameCompareEqual) {
  // As when a module's library is linked into two shared objects: two objects, one category.
  static constexpr module_category copy("uipc.sample", sample_rows);
  static constexpr module_category other("uipc.other", sample_rows);
  EXPECT_NE(static_cast<const void*>(&copy), static_cast<const void*>(&sample_category));
  EXPECT_TRUE(copy == sample_category);
  EXPECT_EQ(error_code(1, copy), error_code(1, sample_category));
  EXPECT_FALSE(other == sample_category);
  EXPECT_NE(error_code(1, other), error_code(1, sample_category));
}

TEST(ModuleCategoryDeathTest, RowsOutOfEnumeratorOrderAreRefused) {
  // A constexpr category with such rows does not compile; built at run time, it aborts.
  static const error_description swapped[] = {
      {sample_errc::slow, "the sample was slow"},
      {sample_errc::lost, "the sample went away"},
  };
  EXPECT_DEATH(
      {
        const module_category bad("uipc.bad", swapped);
        static_cast<void>(bad.name());
      },
      "");
}

}  // namespace
}  // namespace uipc
