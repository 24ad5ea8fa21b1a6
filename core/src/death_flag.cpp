// The death flag's holder thread; see death_flag.hpp.
#include "uipc/core/death_flag.hpp"

#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <system_error>
#include <thread>

namespace uipc {

struct death_flag::state {
  std::atomic<std::uint32_t>* word;
  pid_t armed_by = ::getpid();
  std::mutex mutex;
  std::condition_variable changed;
  bool ready = false;
  int error = 0;
  bool stop = false;
  std::thread holder;

  void hold() {
    // The thread's list is ours alone: glibc's (for robust mutexes this thread
    // never takes) is put back before the thread ends.
    robust_list_head* libc_head = nullptr;
    std::size_t libc_length = 0;
    (void)::syscall(SYS_get_robust_list, 0, &libc_head, &libc_length);
    robust_list entry{};
    robust_list_head head{};
    head.list.next = &entry;
    entry.next = &head.list;
    head.futex_offset = static_cast<long>(reinterpret_cast<std::uintptr_t>(word) -
                                          reinterpret_cast<std::uintptr_t>(&entry));
    head.list_op_pending = nullptr;
    word->store(static_cast<std::uint32_t>(::gettid()) & FUTEX_TID_MASK);
    const long armed = ::syscall(SYS_set_robust_list, &head, sizeof head);
    const int err = armed == 0 ? 0 : errno;
    std::unique_lock lock(mutex);
    ready = true;
    error = err;
    changed.notify_all();
    if (err != 0) return;
    changed.wait(lock, [this] { return stop; });
    // Let go: an empty list, then glibc's back. The word keeps our id; the
    // kernel marks a word only while the list names it.
    head.list.next = &head.list;
    if (libc_head != nullptr) (void)::syscall(SYS_set_robust_list, libc_head, libc_length);
  }
};

death_flag::death_flag(std::unique_ptr<state> s) : state_(std::move(s)) {}

result<std::unique_ptr<death_flag>> death_flag::arm(std::atomic<std::uint32_t>& word) {
  auto s = std::make_unique<state>();
  s->word = &word;
  // Signals go to the program's own threads, never to this one: it starts
  // with them all blocked.
  sigset_t all;
  sigset_t before;
  ::sigfillset(&all);
  ::pthread_sigmask(SIG_BLOCK, &all, &before);
  try {
    s->holder = std::thread([raw = s.get()] { raw->hold(); });
  } catch (const std::system_error& e) {
    ::pthread_sigmask(SIG_SETMASK, &before, nullptr);
    return error_code(e.code().value(), boost::system::system_category());
  }
  ::pthread_sigmask(SIG_SETMASK, &before, nullptr);
  {
    std::unique_lock lock(s->mutex);
    s->changed.wait(lock, [&] { return s->ready; });
  }
  if (s->error != 0) {
    s->holder.join();
    return error_code(s->error, boost::system::system_category());
  }
  return std::unique_ptr<death_flag>(new death_flag(std::move(s)));
}

death_flag::~death_flag() {
  if (::getpid() != state_->armed_by) {
    // A child forked from the process that armed it: the holder is not a
    // thread of this process, and the word is not this process's to touch.
    // The copy of the state is left as it is: its condition variable counts
    // the holder as a waiter, so destroying it would wait for a thread that
    // is not here, and its std::thread names a thread this process cannot
    // join or detach.
    (void)state_.release();  // NOLINT(bugprone-unused-return-value): leaked on purpose
    return;
  }
  {
    std::lock_guard lock(state_->mutex);
    state_->stop = true;
  }
  state_->changed.notify_all();
  state_->holder.join();
}

}  // namespace uipc
