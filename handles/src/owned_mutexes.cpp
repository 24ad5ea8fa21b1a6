// Per-thread records of owned mutexes, abandoned when their thread exits; see
// owned_mutexes.hpp for the design and its lifetime rules.
#include "owned_mutexes.hpp"

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <mutex>
#include <vector>

namespace uipc::handles::detail {

constinit thread_local hot_entry hot;

namespace {

struct pin_table {
  std::mutex mutex;
  std::array<pin, 64> pins;
};

pin_table& table() {
  // Never destroyed: threads (and their records) may end during static destruction.
  static pin_table* const instance = [] {
    // NOLINTNEXTLINE(cppcoreguidelines-owning-memory): lives as long as the process
    auto* t = new pin_table;
    // A fork while another thread holds the lock would leave it held forever in
    // the child.
    ::pthread_atfork([] { table().mutex.lock(); }, [] { table().mutex.unlock(); },
                     [] { table().mutex.unlock(); });
    return t;
  }();
  return *instance;
}

// A pin of the segment `v` shows, taken or made; null when the memory cannot be
// mapped twice (a private mapping: tests' heap segments) or the table is full.
pin* take_pin(const segment_view& v) noexcept {
  const std::uint64_t epoch = v.epoch;
  auto& t = table();
  std::lock_guard lock(t.mutex);
  pin* unused = nullptr;
  for (auto& p : t.pins) {
    if (p.refs != 0 && p.epoch == epoch && p.slot_count == v.slot_count) {
      ++p.refs;
      return &p;
    }
    if (p.refs == 0 && unused == nullptr) unused = &p;
  }
  if (unused == nullptr) return nullptr;
  const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto header_at = reinterpret_cast<std::uintptr_t>(v.header);
  const auto slots_at = reinterpret_cast<std::uintptr_t>(v.slots);
  const auto start = header_at & ~(page - 1);  // inside the same mapping: it starts on a page
  const auto end = reinterpret_cast<std::uintptr_t>(v.slots + v.slot_count);
  const std::size_t length = (end - start + page - 1) & ~(page - 1);
  // Old size 0: a second mapping of the same shared pages, which stays valid
  // whatever becomes of the first.
  void* copy = ::mremap(reinterpret_cast<void*>(start), 0, length, MREMAP_MAYMOVE);
  if (copy == MAP_FAILED) return nullptr;
  auto* base = static_cast<std::byte*>(copy);
  pin& p = *unused;
  p.base = base;
  p.length = length;
  p.header = reinterpret_cast<segment_header*>(base + (header_at - start));
  p.slots = reinterpret_cast<slot*>(base + (slots_at - start));
  p.slot_count = v.slot_count;
  p.epoch = epoch;
  p.refs = 1;
  return &p;
}

void drop_pin(pin* p) noexcept {
  auto& t = table();
  std::lock_guard lock(t.mutex);
  if (--p->refs != 0) return;
  ::munmap(p->base, p->length);
  *p = pin{};
}

// Whether the daemon of a pinned segment has stopped, or died without saying so.
bool segment_finished(const pin& p) noexcept {
  return p.header->state.load(std::memory_order_acquire) !=
             static_cast<std::uint32_t>(daemon_state::running) ||
         death_marked(p.header->death_word);
}

class thread_record {
 public:
  thread_record() = default;
  thread_record(const thread_record&) = delete;
  thread_record& operator=(const thread_record&) = delete;

  // The thread exits: whatever it still owns is abandoned. Through the pins,
  // so the client's mapping may be gone. Process exit does not come here for
  // other threads (nor does a kill): the daemon's repair abandons theirs.
  ~thread_record() {
    const self_id me = self();
    if (owner_.pid == me.pid) {  // not records a fork copied from the parent's thread
      for (const auto& o : owned_) abandon_if_owned_by(o.where->slots[o.index], me);
    }
    if (hot.where != nullptr && hot.pid == me.pid)
      abandon_if_owned_by(hot.where->slots[hot.index], me);
    hot = hot_entry{};
    hot.pid = -1;  // gone: see hot_entry::pid
    owned_.clear();
    for (const auto& v : views_)
      if (v.where != nullptr) drop_pin(v.where);
  }

  void owned(const segment_view& v, std::uint32_t index, self_id me) {
    forget_after_fork(me);
    pin* p = pin_for(v, me);
    if (p == nullptr || index >= p->slot_count) return;
    if (hot.where == p && hot.index == index) return;  // taken again
    for (const auto& o : owned_)
      if (o.where == p && o.index == index) return;
    // The hot entry when it is free, or holds a mutex the thread lost without
    // releasing it (its slot closed, or abandoned by a repair).
    if (owned_.empty() &&
        (hot.where == nullptr || slot_value(hot.where->slots[hot.index]) != me.tid)) {
      hot.where = p;
      hot.index = index;
      return;
    }
    if (owned_.empty()) owner_ = me;
    owned_.push_back({p, index});
    hot.cold_count = static_cast<std::uint32_t>(owned_.size());
  }

  void released(self_id me, const segment_view* v, const slot& released) {
    forget_after_fork(me);
    if (v != nullptr) {
      // Named by the segment's epoch and the index: nothing read through the
      // pin, another mapping of the line the release has just stored to (a
      // load through it right after the store stalls: the alias is seen late).
      const auto index = static_cast<std::uint32_t>(&released - v->slots);
      const std::uint64_t epoch = v->epoch;
      if (hot.where != nullptr && hot.index == index && hot.where->epoch == epoch) {
        hot.where = nullptr;
        after_release(me);
        return;
      }
      for (auto& o : owned_) {
        if (o.index != index || o.where->epoch != epoch) continue;
        o = owned_.back();
        owned_.pop_back();
        hot.cold_count = static_cast<std::uint32_t>(owned_.size());
        after_release(me);
        return;
      }
    }
    // Not found so (no view given, or the header's epoch written over):
    // ownership is the slot's word; a recorded mutex someone else holds now
    // (released by us, or abandoned by a repair and taken) is no longer ours.
    forget_lost(me.tid);
    after_release(me);
  }

 private:
  struct owned_mutex {
    pin* where;
    std::uint32_t index;
  };
  // A client mapping this thread has seen, and the pin of its segment (null: not
  // pinnable). Each entry with a pin holds one reference on it.
  struct known_view {
    const segment_header* client_header;  // null: that mapping is gone or replaced
    std::uint64_t epoch;
    pin* where;
  };

  // After a fork the child's copy lists the parent's thread's mutexes: not ours.
  void forget_after_fork(self_id me) {
    if (!owned_.empty() && owner_.pid != me.pid) owned_.clear();
    if (hot.pid != me.pid) hot = hot_entry{};  // also the view: the pins are the parent's
    hot.cold_count = static_cast<std::uint32_t>(owned_.size());
  }

  // Recorded mutexes the thread no longer owns, though it never released them
  // (a repair abandoned them when the process's last session ended, or their
  // slot was closed) or released them through an unknown view: forgotten.
  void forget_lost(std::uint32_t tid) {
    std::erase_if(
        owned_, [tid](const owned_mutex& o) { return slot_value(o.where->slots[o.index]) != tid; });
    hot.cold_count = static_cast<std::uint32_t>(owned_.size());
    if (hot.where != nullptr && slot_value(hot.where->slots[hot.index]) != tid) hot.where = nullptr;
  }

  // With one view, it is the segment of the mutex just released, whose daemon
  // serves (the release checked it): nothing to let go.
  void after_release(self_id me) {
    if (owned_.empty() && views_.size() > 1) let_go(me);
  }

  pin* pin_for(const segment_view& v, self_id me) {
    const std::uint64_t epoch = v.epoch;
    for (auto& k : views_) {
      if (k.client_header != v.header) continue;
      if (k.epoch == epoch) return cached(v, epoch, k.where, me);
      // Another segment was mapped where this one was: the address says
      // nothing now (recorded mutexes are named by epoch and index, not by it).
      k.client_header = nullptr;
      if (hot.view_header == v.header) forget_view();
    }
    let_go(me);
    views_.reserve(views_.size() + 1);  // may throw, before the pin is taken
    pin* p = take_pin(v);
    views_.push_back({v.header, epoch, p});
    return cached(v, epoch, p, me);
  }

  // Makes `p` (the pin of `v`, or null) the view the hot path tries first.
  pin* cached(const segment_view& v, std::uint64_t epoch, pin* p, self_id me) noexcept {
    hot.view_header = v.header;
    hot.view_epoch = epoch;
    hot.view_pin = p;
    hot.view_slots = p != nullptr ? p->slot_count : 0;
    hot.pid = me.pid;
    hot.many_views = views_.size() > 1;
    return p;
  }

  static void forget_view() noexcept {
    hot.view_header = nullptr;
    hot.view_pin = nullptr;
    hot.view_slots = 0;
  }

  bool owns_in(const pin* p) const {
    if (hot.where == p) return true;
    return std::any_of(owned_.begin(), owned_.end(),
                       [p](const owned_mutex& o) { return o.where == p; });
  }

  // Drops views (and pins) this thread no longer needs: those owning nothing
  // whose mapping was replaced or whose daemon is gone, and the oldest idle
  // ones beyond a few; first forgets mutexes it lost (forget_lost).
  void let_go(self_id me) {
    forget_lost(me.tid);
    constexpr std::size_t most_views = 8;
    std::size_t idle_kept = 0;
    for (auto it = views_.rbegin(); it != views_.rend(); ++it) {
      auto& k = *it;
      const bool idle = k.where == nullptr || !owns_in(k.where);
      if (!idle) continue;
      const bool finished = k.client_header == nullptr ||
                            (k.where != nullptr && segment_finished(*k.where)) ||
                            ++idle_kept > most_views;
      if (!finished) continue;
      if (hot.view_header == k.client_header || (k.where != nullptr && hot.view_pin == k.where))
        forget_view();  // the hot path's view goes with it
      if (k.where != nullptr) drop_pin(k.where);
      k.where = nullptr;
      k.client_header = nullptr;
      k.epoch = 0;
    }
    std::erase_if(views_, [](const known_view& k) {
      return k.client_header == nullptr && k.where == nullptr;
    });
    hot.many_views = views_.size() > 1;
  }

  self_id owner_{};  // whose mutexes owned_ lists
  std::vector<owned_mutex> owned_;
  std::vector<known_view> views_;
};

thread_local thread_record this_thread_record;

}  // namespace

// The paths through the thread's record, kept out of the inline hot paths.
void record_owned(const segment_view& v, std::uint32_t index, self_id me) noexcept {
  if (hot.pid == -1) return;  // the thread's record is gone (its exit is under way)
  try {
    this_thread_record.owned(v, index, me);
    // No memory for the record: that mutex is abandoned with its process only.
    // NOLINTNEXTLINE(bugprone-empty-catch): nothing else to do, see above
  } catch (...) {
  }
}

void record_released(self_id me, const segment_view* v, const slot& released) noexcept {
  if (hot.pid == -1) return;  // the thread's record is gone (its exit is under way)
  this_thread_record.released(me, v, released);
}

std::size_t pinned_segments() noexcept {
  auto& t = table();
  std::lock_guard lock(t.mutex);
  return static_cast<std::size_t>(
      std::count_if(t.pins.begin(), t.pins.end(), [](const pin& p) { return p.refs != 0; }));
}

}  // namespace uipc::handles::detail
