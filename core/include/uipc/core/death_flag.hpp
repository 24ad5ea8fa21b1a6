// A word in shared memory that the kernel itself marks when this process ends,
// however it ends (kill -9 included): a peer learns of the death with one load,
// where asking the kernel (a pidfd, kill(pid, 0)) costs a system call.
//
// The mechanism is the one robust pthread mutexes stand on. A thread of ours
// registers the word with the kernel as a robust futex it holds (its thread id
// in the word); when that thread ends without letting go, the kernel sets
// FUTEX_OWNER_DIED in the word (and wakes one futex waiter, if the word's
// FUTEX_WAITERS bit says there is one: do not count on it). The thread ends
// only with the process or when the flag is destroyed, which lets go first:
// so the mark means "the process died", never "it stopped in order" (say that
// in a word of your own).
//
// Another process that can write the word can forge the mark or hide it; it
// belongs in memory whose writers are trusted with everything else in it.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>

#include "uipc/core/error.hpp"

namespace uipc {

/// FUTEX_OWNER_DIED: the kernel's mark on the word of a holder that died.
inline constexpr std::uint32_t death_mark = 0x40000000;

/// Whether the process that armed `word` has died. A word never armed (0) has not.
inline bool death_marked(const std::atomic<std::uint32_t>& word) noexcept {
  return (word.load(std::memory_order_acquire) & death_mark) != 0;
}

class death_flag {
 public:
  /// Arms `word`, which must stay mapped (shared) until the flag is destroyed:
  /// a thread of this process holds it from now on. Errors: those of creating
  /// the thread or of set_robust_list.
  static result<std::unique_ptr<death_flag>> arm(std::atomic<std::uint32_t>& word);

  /// Lets go of the word (it keeps the thread's id, unmarked) and ends the
  /// thread. In a child forked since, leaves both alone.
  ~death_flag();
  death_flag(const death_flag&) = delete;
  death_flag& operator=(const death_flag&) = delete;

  struct state;

 private:
  explicit death_flag(std::unique_ptr<state> s);
  std::unique_ptr<state> state_;
};

}  // namespace uipc
