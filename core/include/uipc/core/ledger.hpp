// A ledger that counts references per holder, so that everything a holder held
// is released exactly once when it goes away, however it goes away.
#pragma once

#include <cstdint>
#include <functional>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "uipc/core/error.hpp"

namespace uipc {

/// Counts, for each holder (a client connection, a plug-in), how many references
/// it has on each object. Key is what identifies the object: a handle number, or a
/// ref_ptr<T> (with a hash on the pointer), in which case the ledger's entry itself
/// keeps the object alive while any holder counts a reference to it.
///
/// Thread-safe: every member may be called from any thread. Nothing the ledger
/// returns is destroyed under its lock, so releasing a ref_ptr key (and running the
/// object's destructor) never happens while the ledger is locked.
template <class Holder, class Key, class KeyHash = std::hash<Key>,
          class HolderHash = std::hash<Holder>>
class ledger {
 public:
  using entry =
      std::pair<Key, std::uint32_t>;  ///< an object and how many references were held on it

  /// Records one more reference of `holder` on `key`; returns the holder's count after it.
  std::uint32_t acquire(const Holder& holder, const Key& key) {
    std::lock_guard lock(mutex_);
    return ++holders_[holder][key];
  }

  /// Drops one reference of `holder` on `key`; returns the holder's count after it.
  /// errc::not_held when the holder has none: nothing changes.
  result<std::uint32_t> release(const Holder& holder, const Key& key) {
    typename counts::node_type dropped;  // declared first: destroyed after the lock is released
    std::lock_guard lock(mutex_);
    auto h = holders_.find(holder);
    if (h == holders_.end()) return make_error_code(errc::not_held);
    auto k = h->second.find(key);
    if (k == h->second.end()) return make_error_code(errc::not_held);
    const std::uint32_t left = --k->second;
    if (left == 0) {
      dropped = h->second.extract(k);
      if (h->second.empty()) holders_.erase(h);
    }
    return left;
  }

  /// Removes the holder and returns every object it held with its count, each
  /// exactly once; a second call for the same holder returns nothing. The caller
  /// releases the objects (for ref_ptr keys, dropping the vector does).
  std::vector<entry> release_all(const Holder& holder) {
    counts held;
    {
      std::lock_guard lock(mutex_);
      auto h = holders_.find(holder);
      if (h == holders_.end()) return {};
      held = std::move(h->second);
      holders_.erase(h);
    }
    return {std::make_move_iterator(held.begin()), std::make_move_iterator(held.end())};
  }

  /// The holder's count on `key` (0 when none).
  std::uint32_t count(const Holder& holder, const Key& key) const {
    std::lock_guard lock(mutex_);
    auto h = holders_.find(holder);
    if (h == holders_.end()) return 0;
    auto k = h->second.find(key);
    return k == h->second.end() ? 0 : k->second;
  }

  /// The number of distinct objects the holder has references on.
  std::size_t objects_held(const Holder& holder) const {
    std::lock_guard lock(mutex_);
    auto h = holders_.find(holder);
    return h == holders_.end() ? 0 : h->second.size();
  }

  /// The number of holders with at least one reference.
  std::size_t holders() const {
    std::lock_guard lock(mutex_);
    return holders_.size();
  }

 private:
  using counts = std::unordered_map<Key, std::uint32_t, KeyHash>;

  mutable std::mutex mutex_;
  std::unordered_map<Holder, counts, HolderHash> holders_;
};

/// Hash for ref_ptr<T> keys: by the object's address.
struct ref_hash {
  template <class Ptr>
  std::size_t operator()(const Ptr& p) const noexcept {
    return std::hash<const void*>{}(p.get());
  }
};

}  // namespace uipc
