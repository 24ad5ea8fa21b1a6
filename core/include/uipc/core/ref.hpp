// Intrusive, atomic reference counting: ref_counted<T> as a base, ref_ptr<T> to hold one.
#pragma once

#include <boost/smart_ptr/intrusive_ptr.hpp>
#include <boost/smart_ptr/intrusive_ref_counter.hpp>
#include <utility>

namespace uipc {

/// Base of an object whose lifetime several owners share. The count is atomic:
/// refs may be copied and dropped on any thread. The object is deleted, through
/// T's destructor, when the last ref_ptr goes.
template <class T>
using ref_counted = boost::intrusive_ref_counter<T, boost::thread_safe_counter>;

/// A counted reference to a ref_counted<T> object.
template <class T>
using ref_ptr = boost::intrusive_ptr<T>;

/// Builds a T and returns the first reference to it.
template <class T, class... Args>
ref_ptr<T> make_ref(Args&&... args) {
  return ref_ptr<T>(new T(
      std::forward<Args>(args)...));  // NOLINT(cppcoreguidelines-owning-memory): adopted by the ref
}

/// How many references exist right now (for tests and statistics only: racy by nature).
template <class T>
unsigned use_count(const ref_ptr<T>& r) noexcept {
  return r ? r->use_count() : 0;
}

}  // namespace uipc
