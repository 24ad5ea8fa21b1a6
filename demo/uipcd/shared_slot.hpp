// A value that one thread replaces whole while others read it: readers take a
// reference, so what they read lives until they let go of it.
//
// Not std::atomic<std::shared_ptr>: libstdc++ 12's load() reads the pointer
// under a lock bit that it releases with a relaxed store, so a reader and a
// writer are not ordered (ThreadSanitizer reports it, rightly). A mutex held
// for a pointer copy costs a reader tens of nanoseconds.
#pragma once

#include <memory>
#include <mutex>
#include <utility>

namespace uipcd {

template <class T>
class shared_slot {
 public:
  std::shared_ptr<const T> load() const {
    std::lock_guard lock(mutex_);
    return value_;
  }
  /// The old value is released outside the lock (it may be large).
  void store(std::shared_ptr<const T> next) {
    {
      std::lock_guard lock(mutex_);
      value_.swap(next);
    }
  }  // `next`, now the old value, goes here

 private:
  mutable std::mutex mutex_;
  std::shared_ptr<const T> value_;
};

}  // namespace uipcd
