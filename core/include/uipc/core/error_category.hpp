// Defines a module's error category in a few lines: its name and, per
// enumerator, a message and the portable condition it means.
#pragma once

#include <boost/system/error_category.hpp>
#include <boost/system/error_condition.hpp>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <type_traits>

#include "uipc/core/error.hpp"

namespace uipc {

/// One enumerator of a module's errc: its message, the portable condition it
/// means (none for a code with no portable meaning, such as a caller's bad
/// argument), and optionally the generic condition it also compares equal to,
/// for code that tests `ec == boost::system::errc::timed_out`.
struct error_description {
  // Not explicit: rows are written as braced lists.
  template <class Enum>
  requires std::is_enum_v<Enum>
  constexpr error_description(
      Enum code, const char* text, std::optional<condition> portable_condition = std::nullopt,
      boost::system::errc::errc_t generic_condition = boost::system::errc::success) noexcept
      : value(static_cast<int>(code)),
        message(text),
        portable(portable_condition),
        generic(generic_condition) {}

  int value;
  const char* message;
  std::optional<condition> portable;
  boost::system::errc::errc_t generic;
};

/// A module's error category, built from a table. Define both at namespace
/// scope in the module's .cpp, as constexpr objects (constant-initialized, never
/// destroyed, so an error_code stays usable during static destruction):
///
///   constexpr error_description descriptions[] = {
///       {errc::name_not_found, "no object has this name", condition::not_found},
///       {errc::invalid_argument, "invalid argument"},
///   };
///   constexpr module_category category("uipc.handles", descriptions);
///   const boost::system::error_category& handles_category() noexcept { return category; }
///
/// The rows go in enumerator order from 1 with no gap: a constexpr category
/// whose table breaks that does not compile. A value without a row reads
/// "unknown <name> error <value>" and has no condition. Two categories with the
/// same name compare equal (the id is a hash of the name), so a category linked
/// into two shared objects still matches itself.
class module_category final : public boost::system::error_category {
 public:
  /// `name` and `rows` must outlive the category: string literals and a constexpr array.
  constexpr module_category(const char* name, std::span<const error_description> rows) noexcept
      : boost::system::error_category(name_id(name)), name_(name), rows_(rows) {
    for (std::size_t i = 0; i < rows.size(); ++i) {
      if (rows[i].value != static_cast<int>(i + 1)) rows_not_in_enumerator_order();
    }
  }

  const char* name() const noexcept override { return name_; }
  std::string message(int value) const override;
  boost::system::error_condition default_error_condition(int value) const noexcept override;
  using boost::system::error_category::equivalent;
  /// True for the row's uipc::condition, and for its default (generic) condition.
  bool equivalent(int value, const boost::system::error_condition& cond) const noexcept override;

  /// The portable condition of `value`, if its row names one.
  std::optional<condition> portable_condition(int value) const noexcept;

 private:
  /// 64-bit FNV-1a of the name.
  static constexpr std::uint64_t name_id(const char* name) noexcept {
    std::uint64_t h = 0xcbf29ce484222325u;
    for (; *name != '\0'; ++name) h = (h ^ static_cast<unsigned char>(*name)) * 0x100000001b3u;
    return h;
  }
  /// Not constexpr: reaching it in a constant expression is the compile error. At run time it
  /// aborts.
  [[noreturn]] static void rows_not_in_enumerator_order() noexcept;
  const error_description* find(int value) const noexcept;

  const char* name_;
  std::span<const error_description> rows_;
};

}  // namespace uipc
