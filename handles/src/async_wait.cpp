// Waiting on the event loop: client::async_wait*, the waiter thread that sleeps
// for them, and the attempts on the handlers' executors (see async_wait.hpp).
#include "async_wait.hpp"

#include <unistd.h>

#include <algorithm>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/prefer.hpp>
#include <boost/asio/system_executor.hpp>
#include <cerrno>
#include <climits>

#include "session.hpp"
#include "slot_state.hpp"
#include "uipc/core/futex.hpp"

namespace uipc::handles {

namespace detail {

namespace {

using steady = std::chrono::steady_clock;

/// How often the thread looks whether the daemon still lives while nothing
/// wakes it (the synchronous waits' sleep slice).
constexpr std::chrono::seconds daemon_look_interval{1};
/// After an attempt that met a transaction lock (a few instructions long).
constexpr std::chrono::microseconds lock_retry_interval{200};
/// futex_waitv's limit: the control word and max_async_wait_objects others.
constexpr std::size_t max_words = max_async_wait_objects + 1;
static_assert(max_words == 128);

/// Installed in the handler's cancellation slot: marks the wait and wakes the
/// thread, which sends it to its executor to complete with operation_aborted.
struct cancel_handler {
  std::weak_ptr<async_wait_op> op;
  void operator()(boost::asio::cancellation_type_t type) const {
    if (type == boost::asio::cancellation_type::none) return;
    if (auto o = op.lock()) {
      o->cancelled.store(true);
      o->core->poke();
    }
  }
};

}  // namespace

// ---- one wait -------------------------------------------------------------------

async_wait_op::~async_wait_op() {
  // A wait whose executor dropped it (an io_context destroyed with it queued),
  // or whose start failed half-way (out of memory), still leaves the slots'
  // sleeper counts and the thread's watched words as it found them. Never
  // released under the core's lock (see waiter_core), so forget() may take it.
  unregister();
  if (admitted && core) core->forget(*this);
}

void async_wait_op::unregister() noexcept {
  if (!registered) return;
  registered = false;
  for (const auto& t : targets) {
    t.s->waiters.fetch_sub(1, std::memory_order_seq_cst);
    t.s->multi_waiters.fetch_sub(1, std::memory_order_seq_cst);
  }
}

void async_wait_op::retry(const std::shared_ptr<async_wait_op>& self) {
  async_wait_op& op = *self;
  if (op.done) return;
  error_code ec = op.preset;
  wait_result r{wait_status::timed_out, 0};
  if (!ec) {
    if (op.cancelled.load() || op.core->closed()) {
      ec = boost::asio::error::operation_aborted;
    } else if (op.has_mutex && op.core->on_waiter_thread()) {
      // No executor of its own: a mutex taken here would belong to a thread the
      // caller cannot release it from.
      ec = make_error_code(errc::invalid_argument);
    } else {
      // Read before the attempt: a change after it moves a word from what the
      // thread will sleep on, and futex_waitv returns at once.
      for (std::size_t i = 0; i < op.targets.size(); ++i)
        op.seen[i] = op.targets[i].s->seq.load(std::memory_order_seq_cst);
      met_transaction_lock = false;
      auto taken = wait(op.map->view, std::span(op.targets.data(), op.targets.size()), op.all,
                        std::chrono::nanoseconds(0), std::chrono::nanoseconds(0));
      if (!taken) {
        ec = taken.error();
      } else if (taken->status != wait_status::timed_out) {
        r = {taken->status, op.positions[taken->index]};
      } else if (const auto now = steady::now(); now < op.deadline) {
        op.now = false;
        // A try that met a lock is tried again soon (its end bumps no futex
        // word), then less often while locks keep meeting it.
        if (met_transaction_lock) {
          op.lock_backoff = std::min<std::chrono::nanoseconds>(
              op.lock_backoff.count() == 0 ? lock_retry_interval : op.lock_backoff * 2,
              daemon_look_interval);
          op.lock_retry = now + op.lock_backoff;
        } else {
          op.lock_backoff = {};
          op.lock_retry = steady::time_point::max();
        }
        if (op.core->arm(self)) return;
        ec = boost::asio::error::operation_aborted;  // the client went meanwhile
      }
    }
  }
  op.finish(ec, r);
}

void async_wait_op::end() noexcept {
  done = true;
  unregister();
  if (admitted) core->forget(*this);
  if (cancel_slot.is_connected()) cancel_slot.clear();
}

void async_wait_op::finish(error_code ec, wait_result r) {
  end();
  // Work stays counted until the handler has run.
  auto work = std::move(executor);
  auto h = std::move(handler);
  handler = std::monostate{};
  if (auto* one = std::get_if<one_handler>(&h)) {
    std::move (*one)(ec, r.status);
  } else if (auto* many = std::get_if<many_handler>(&h)) {
    std::move (*many)(ec, r);
  }
}

void async_wait_op::drop_handlers() noexcept {
  // No thread runs the context; the waiter thread may be about to hand the wait
  // to its executor: after withdraw() it never will.
  if (core) core->withdraw(*this);
  registration.reset();  // ends the registration (the optional's reset): the context is going
  if (done) return;
  end();
  // Destroyed at the end, the handler first: it may own the client (and this
  // wait's last holder but the registry's).
  auto work = std::move(executor);
  auto h = std::move(handler);
  handler = std::monostate{};
}

// ---- the waiter thread ----------------------------------------------------------

error_code waiter_core::start() noexcept {
  try {
    thread_ = std::thread([self = shared_from_this()] { self->run(); });
  } catch (const std::system_error& e) {  // out of threads or memory: the wait fails, nothing else
    return e.code().value() == EAGAIN
               ? make_error_code(boost::system::errc::resource_unavailable_try_again)
               : error_code(e.code().value(), boost::system::system_category());
  }
  thread_id_ = thread_.get_id();
  return {};
}

error_code waiter_core::admit(async_wait_op& op) {
  {
    std::lock_guard lk(m_);
    std::size_t fresh = 0;
    for (auto* w : op.words) {
      if (std::none_of(watched_.begin(), watched_.end(),
                       [w](const auto& e) { return e.first == w; }))
        ++fresh;
    }
    if (watched_.size() + fresh > max_async_wait_objects)
      return make_error_code(errc::invalid_argument);
    watched_.reserve(max_async_wait_objects);  // may throw (once); nothing below does
    for (auto* w : op.words) {
      auto it = std::find_if(watched_.begin(), watched_.end(),
                             [w](const auto& e) { return e.first == w; });
      if (it == watched_.end()) {
        watched_.emplace_back(w, 1);
      } else {
        ++it->second;
      }
    }
    op.admitted = true;
  }
  // As a sleeping synchronous wait-any registers (see detail::wait), before the
  // first read of seq; held until the wait completes.
  for (const auto& t : op.targets) {
    t.s->multi_waiters.fetch_add(1, std::memory_order_seq_cst);
    t.s->waiters.fetch_add(1, std::memory_order_seq_cst);
  }
  op.registered = true;
  return {};
}

void waiter_core::forget(async_wait_op& op) noexcept {
  std::lock_guard lk(m_);
  op.admitted = false;
  for (auto* w : op.words) {
    auto it =
        std::find_if(watched_.begin(), watched_.end(), [w](const auto& e) { return e.first == w; });
    if (it != watched_.end() && --it->second == 0) watched_.erase(it);
  }
}

bool waiter_core::arm(std::shared_ptr<async_wait_op> op) {
  {
    std::lock_guard lk(m_);
    if (stopping_.load()) return false;
    armed_.push_back(std::move(op));
    control_.fetch_add(1, std::memory_order_seq_cst);
  }
  futex::wake(control_, INT_MAX);
  return true;
}

void waiter_core::poke() noexcept {
  {
    std::lock_guard lk(m_);
    control_.fetch_add(1, std::memory_order_seq_cst);
  }
  futex::wake(control_, INT_MAX);
}

void waiter_core::withdraw(async_wait_op& op) noexcept {
  std::unique_lock lk(m_);
  op.withdrawn = true;
  auto it =
      std::find_if(armed_.begin(), armed_.end(), [&op](const auto& a) { return a.get() == &op; });
  std::shared_ptr<async_wait_op> ours;
  if (it != armed_.end()) {
    ours = std::move(*it);  // released after the lock: it may be the last
    armed_.erase(it);
  }
  if (!on_waiter_thread()) handed_.wait(lk, [&] { return handing_ != &op; });
  lk.unlock();
}

void waiter_core::stop() {
  {
    std::lock_guard lk(m_);
    stopping_.store(true);
    control_.fetch_add(1, std::memory_order_seq_cst);
  }
  futex::wake(control_, INT_MAX);
  if (!thread_.joinable()) return;
  if (on_waiter_thread()) {
    thread_.detach();  // a handler run inline by the thread destroyed the client
  } else {
    thread_.join();
  }
}

void waiter_core::run() {
  std::vector<std::shared_ptr<async_wait_op>> due;
  std::array<futex::watch, max_words> vec;
  auto last_look = steady::now();
  std::unique_lock lk(m_);
  for (;;) {
    const bool stopping = stopping_.load();
    const bool running = !map_ || map_->view.running();
    const auto now = steady::now();
    auto until = now + daemon_look_interval;
    std::size_t n = 0;
    vec[n++] = {&control_, control_.load(std::memory_order_seq_cst)};
    for (auto it = armed_.begin(); it != armed_.end();) {
      async_wait_op& op = **it;
      // A withdrawn wait armed again by an attempt that ran inline during its
      // withdrawal leaves too (unhanded: see below).
      bool go = stopping || !running || op.now || op.cancelled.load() || op.withdrawn ||
                now >= op.deadline || now >= op.lock_retry;
      for (std::size_t i = 0; !go && i < op.targets.size(); ++i)
        go = op.targets[i].s->seq.load(std::memory_order_seq_cst) != op.seen[i];
      if (go) {
        due.push_back(std::move(*it));
        it = armed_.erase(it);
        continue;
      }
      until = std::min({until, op.deadline, op.lock_retry});
      for (std::size_t i = 0; i < op.targets.size(); ++i) {
        const std::atomic<std::uint32_t>* word = &op.targets[i].s->seq;
        if (std::none_of(vec.begin() + 1, vec.begin() + static_cast<std::ptrdiff_t>(n),
                         [word](const futex::watch& e) { return e.word == word; }))
          vec[n++] = {word, op.seen[i]};  // other processes wake it
      }
      ++it;
    }
    if (!due.empty()) {
      for (auto& op : due) {
        if (op->withdrawn) continue;  // its context went: its executor with it
        handing_ = op.get();
        lk.unlock();
        // An inline executor runs the attempt (and the handler) right here.
        op->executor.execute([op] { async_wait_op::retry(op); });
        lk.lock();
        handing_ = nullptr;
        handed_.notify_all();
      }
      lk.unlock();
      due.clear();  // perhaps the last holders: destroyed without our lock
      lk.lock();
      continue;
    }
    if (stopping) return;
    lk.unlock();
    // The core's wait (futex_waitv, or its fallback where the kernel refuses
    // it); a refused call is the fallback's business, an EINTR a wake like any.
    (void)futex::wait_any_until(std::span<const futex::watch>(vec.data(), n), until);
    bool look = false;
    if (steady::now() - last_look >= daemon_look_interval) {
      look = true;
      last_look = steady::now();
      // A daemon killed before it could say so: as a synchronous wait does,
      // tell every process waiting in the segment (the attempts then fail with
      // errc::daemon_lost).
      if (map_ && map_->view.running() && (map_->daemon_gone() || map_->kernel_says_gone(false)))
        publish_state(map_->view, daemon_state::stopped);
    }
    lk.lock();
    // Every armed wait is tried once a look, as a synchronous sleeper retries
    // each slice: a signal whose bump a client suppressed (any client may
    // write a slot's sleeper count) still completes it.
    // A mutex whose owning thread vanished without abandoning it (its record
    // lost, say: a client may write the value word it checks) is freed here,
    // as a synchronous sleeper's look frees it.
    if (look) {
      for (auto& op : armed_) {
        op->now = true;
        if (!op->has_mutex) continue;
        for (const auto& t : op->targets)
          if (t.type == object_type::mutex) (void)abandon_if_owner_vanished(*t.s);
      }
    }
  }
}

void async_waiter_deleter::operator()(async_waiter* w) const noexcept {
  if (w == nullptr) return;
  std::shared_ptr<waiter_core> core;
  {
    std::lock_guard lk(w->m);
    core = std::move(w->core);
  }
  if (core) core->stop();
  delete w;  // NOLINT(cppcoreguidelines-owning-memory): the deleter of async_waiter_ptr
}

async_waiter_ptr make_async_waiter() { return async_waiter_ptr(new async_waiter); }

}  // namespace detail

// ---- the facade -----------------------------------------------------------------

namespace {

template <class Handler>
void adopt(detail::async_wait_op& op, Handler& h) {
  op.executor = boost::asio::prefer(
      boost::asio::get_associated_executor(
          h, boost::asio::any_completion_executor(boost::asio::system_executor())),
      boost::asio::execution::outstanding_work.tracked);
  op.cancel_slot = boost::asio::get_associated_cancellation_slot(h);
}

}  // namespace

void client::start_async_wait(const object& o, std::chrono::nanoseconds timeout,
                              boost::asio::execution_context* context, async_wait_handler handler) {
  auto op = std::make_shared<detail::async_wait_op>();
  adopt(*op, handler);
  op->handler = std::move(handler);
  op->single = true;
  const object* set[] = {&o};
  start_async(set, false, timeout, context, std::move(op));
}

void client::start_async_wait_many(std::span<const object* const> objects, bool all,
                                   std::chrono::nanoseconds timeout,
                                   boost::asio::execution_context* context,
                                   async_wait_many_handler handler) {
  auto op = std::make_shared<detail::async_wait_op>();
  adopt(*op, handler);
  op->handler = std::move(handler);
  start_async(objects, all, timeout, context, std::move(op));
}

void client::start_async(std::span<const object* const> objects, bool all,
                         std::chrono::nanoseconds timeout, boost::asio::execution_context* context,
                         std::shared_ptr<detail::async_wait_op> op) {
  op->all = all;
  if (timeout.count() >= 0) {
    const auto start = std::chrono::steady_clock::now();
    if (timeout < std::chrono::steady_clock::time_point::max() - start)
      op->deadline = start + timeout;
  }
  // The same checks as wait_many, reported through the handler.
  auto check = [&]() -> error_code {
    detail::wait_set set;
    if (auto ec = build_wait_set(objects, all, set)) return ec;
    for (const auto& e : set) {
      op->targets.push_back(e.target);
      op->positions.push_back(e.position);
      op->has_mutex = op->has_mutex || e.target.type == object_type::mutex;
      auto* word = &e.target.s->seq;
      if (std::find(op->words.begin(), op->words.end(), word) == op->words.end())
        op->words.push_back(word);
    }
    op->map = session_->map;
    return {};
  };
  error_code ec = check();
  if (context != nullptr) {
    try {
      op->registration.emplace(*context, *op);
      op->registration->hold(op);
    } catch (const boost::system::system_error& e) {  // no descriptor for the context's reactor
      if (!ec) ec = e.code();
    } catch (const std::bad_alloc&) {
      if (!ec) ec = make_error_code(boost::system::errc::not_enough_memory);
    }
  }
  if (!async_waiter_) async_waiter_ = detail::make_async_waiter();  // a moved-from client
  {
    std::lock_guard lk(async_waiter_->m);
    if (!async_waiter_->core) {
      auto core = std::make_shared<detail::waiter_core>(session_ ? session_->map : nullptr);
      if (auto started = core->start()) {
        if (!ec) ec = started;
      } else {
        async_waiter_->core = std::move(core);
      }
    }
    op->core = async_waiter_->core;
  }
  if (!op->core) {  // no waiter thread could be started: fail on the handler's executor
    op->targets.clear();
    op->preset = ec;
    auto ex = op->executor;
    ex.execute([op] { detail::async_wait_op::retry(op); });
    return;
  }
  if (!ec) ec = op->core->admit(*op);
  if (ec) {
    op->targets.clear();  // nothing was registered: a failed wait touches no slot
    op->preset = ec;
  } else if (op->cancel_slot.is_connected()) {
    op->cancel_slot.template emplace<detail::cancel_handler>(detail::cancel_handler{op});
  }
  // The first attempt too goes through the thread, so the handler never runs
  // inside this call (unless its executor runs everything inline).
  const bool armed = op->core->arm(op);
  (void)armed;  // the client lives, so its core is not stopping
}

}  // namespace uipc::handles
