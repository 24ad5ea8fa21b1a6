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

// This process's own mapping of one segment's header and table. Written under
// pin_table::mutex only; a thread holding a reference reads the fixed fields
// without it (they do not change while refs > 0).
struct pin {
  std::byte* base = nullptr;
  std::size_t length = 0;
  slot* slots = nullptr;
  segment_header* header = nullptr;
  std::uint32_t slot_count = 0;
  std::uint64_t epoch = 0;  // the daemon's random epoch names the segment
  std::uint32_t refs = 0;   // thread records holding this pin
};

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
  const std::uint64_t epoch = v.header->epoch.load(std::memory_order_acquire);
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
    if (hot.seen_at != nullptr && hot.pid == me.pid)
      abandon_if_owned_by(hot.where->slots[hot.index], me);
    hot = hot_entry{};
    owned_.clear();
    for (const auto& v : views_)
      if (v.where != nullptr) drop_pin(v.where);
  }

  void owned(const segment_view& v, std::uint32_t index, self_id me) {
    forget_after_fork(me);
    pin* p = pin_for(v, me);
    if (p == nullptr || index >= p->slot_count) return;
    const slot* at = &v.slots[index];
    if (hot.seen_at != nullptr && hot.where == p && hot.index == index) {
      hot.seen_at = at;  // taken again, maybe through another mapping
      return;
    }
    for (auto& o : owned_) {
      if (o.where == p && o.index == index) {
        o.seen_at = at;
        return;
      }
    }
    if (hot.seen_at == nullptr && owned_.empty()) {
      hot.seen_at = at;
      hot.where = p;
      hot.index = index;
      return;
    }
    if (owned_.empty()) owner_ = me;
    owned_.push_back({p, index, at});
    hot.cold = static_cast<std::uint32_t>(owned_.size());
  }

  void released(self_id me, const slot& released, std::uint32_t index) {
    forget_after_fork(me);
    if (hot.seen_at == &released && hot.index == index) {
      hot.seen_at = nullptr;
      if (owned_.empty() && views_.size() > 1) let_go();
      return;
    }
    // Found by the address the release used, and its index: the pin's address
    // is another mapping of the same line, and a load through it right after
    // the release's store through ours stalls (the processor sees the alias
    // late). An address alone could be another segment's slot, mapped over
    // part of where a recorded one was; with the index it is the same table
    // at the same place, which pin_for() clears when the segment changed.
    for (auto& o : owned_) {
      if (o.seen_at != &released || o.index != index) continue;
      o = owned_.back();
      owned_.pop_back();
      hot.cold = static_cast<std::uint32_t>(owned_.size());
      if (owned_.empty() && views_.size() > 1) let_go();
      return;
    }
    // Recorded through another client's mapping: ownership is the slot's word;
    // a recorded mutex someone else holds now (released by us, or abandoned by
    // a repair and taken) is no longer ours.
    const std::uint32_t tid = me.tid;
    std::erase_if(
        owned_, [tid](const owned_mutex& o) { return slot_value(o.where->slots[o.index]) != tid; });
    hot.cold = static_cast<std::uint32_t>(owned_.size());
    if (hot.seen_at != nullptr && slot_value(hot.where->slots[hot.index]) != tid)
      hot.seen_at = nullptr;
    // With one view, it is the segment of the mutex just released, whose
    // daemon serves (the release checked it): nothing to let go.
    if (owned_.empty() && views_.size() > 1) let_go();
  }

 private:
  struct owned_mutex {
    pin* where;
    std::uint32_t index;
    const slot* seen_at;  ///< the slot in the mapping it was taken through (compared, never read)
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
    hot.cold = static_cast<std::uint32_t>(owned_.size());
  }

  pin* pin_for(const segment_view& v, self_id me) {
    const std::uint64_t epoch = v.header->epoch.load(std::memory_order_acquire);
    for (auto& k : views_) {
      if (k.client_header != v.header) continue;
      if (k.epoch == epoch) return cached(v, epoch, k.where, me);
      // Another segment was mapped where this one was: the address says
      // nothing now, nor do the slot addresses recorded through it. The hot
      // entry moves to the vector, where an entry can be without its address.
      k.client_header = nullptr;
      for (auto& o : owned_)
        if (o.where == k.where) o.seen_at = nullptr;
      if (hot.seen_at != nullptr && hot.where == k.where) {
        if (owned_.empty()) owner_ = me;
        owned_.push_back({hot.where, hot.index, nullptr});  // may throw: the caller catches
        hot.seen_at = nullptr;
        hot.cold = static_cast<std::uint32_t>(owned_.size());
      }
      if (hot.view_header == v.header) hot.view_header = nullptr;
    }
    let_go();
    views_.reserve(views_.size() + 1);  // may throw, before the pin is taken
    pin* p = take_pin(v);
    views_.push_back({v.header, epoch, p});
    return cached(v, epoch, p, me);
  }

  // Makes `p` (the pin of `v`, or null) the view the hot path tries first.
  static pin* cached(const segment_view& v, std::uint64_t epoch, pin* p, self_id me) noexcept {
    hot.view_header = v.header;
    hot.view_epoch = epoch;
    hot.view_pin = p;
    hot.view_slots = p != nullptr ? p->slot_count : 0;
    hot.pid = me.pid;
    return p;
  }

  bool owns_in(const pin* p) const {
    if (hot.seen_at != nullptr && hot.where == p) return true;
    return std::any_of(owned_.begin(), owned_.end(),
                       [p](const owned_mutex& o) { return o.where == p; });
  }

  // Drops views (and pins) this thread no longer needs: those owning nothing
  // whose mapping was replaced or whose daemon is gone, and the oldest idle
  // ones beyond a few. First forgets recorded mutexes the thread no longer
  // owns though it never released them (the daemon abandoned them when the
  // process's last session ended, or closed their slot): the releases find
  // their own entries without looking at the others.
  void let_go() {
    const std::uint32_t tid = self().tid;
    std::erase_if(
        owned_, [tid](const owned_mutex& o) { return slot_value(o.where->slots[o.index]) != tid; });
    hot.cold = static_cast<std::uint32_t>(owned_.size());
    if (hot.seen_at != nullptr && slot_value(hot.where->slots[hot.index]) != tid)
      hot.seen_at = nullptr;
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
        hot.view_header = nullptr;  // the hot path's view goes with it
      if (k.where != nullptr) drop_pin(k.where);
      k.where = nullptr;
      k.client_header = nullptr;
      k.epoch = 0;
    }
    std::erase_if(views_, [](const known_view& k) {
      return k.client_header == nullptr && k.where == nullptr;
    });
  }

  self_id owner_{};  // whose mutexes owned_ lists
  std::vector<owned_mutex> owned_;
  std::vector<known_view> views_;
};

thread_local thread_record this_thread_record;

}  // namespace

// The paths through the thread's record, kept out of the inline hot paths.
void record_owned(const segment_view& v, std::uint32_t index, self_id me) noexcept {
  try {
    this_thread_record.owned(v, index, me);
    // No memory for the record: that mutex is abandoned with its process only.
    // NOLINTNEXTLINE(bugprone-empty-catch): nothing else to do, see above
  } catch (...) {
  }
}

void record_released(self_id me, const slot& released, std::uint32_t index) noexcept {
  this_thread_record.released(me, released, index);
}

std::size_t pinned_segments() noexcept {
  auto& t = table();
  std::lock_guard lock(t.mutex);
  return static_cast<std::size_t>(
      std::count_if(t.pins.begin(), t.pins.end(), [](const pin& p) { return p.refs != 0; }));
}

}  // namespace uipc::handles::detail
