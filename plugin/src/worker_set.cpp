// Workers that grow while calls nest (worker_set.hpp).
#include "worker_set.hpp"

namespace uipc::plugin::detail {
namespace {

thread_local worker_set* current = nullptr;  // the set this thread works for

}  // namespace

worker_set::worker_set(unsigned first, unsigned most, std::function<void()> serve)
    : serve_(std::move(serve)),
      first_(first == 0 ? 1 : first),
      most_(most < first_ ? first_ : most) {}

worker_set::~worker_set() { join(); }

void worker_set::start() {
  std::lock_guard lock(mutex_);
  while (started_ < first_ && launch_locked()) {
  }
}

bool worker_set::launch_locked() noexcept {
  try {
    threads_.emplace_back([this] { run(); });
  } catch (...) {
    return false;  // no thread (or no memory for it): counted as never started
  }
  ++started_;
  return true;
}

void worker_set::run() {
  current = this;
  serve_();
  current = nullptr;
}

void worker_set::join() {
  for (;;) {
    std::vector<std::thread> batch;
    {
      std::lock_guard lock(mutex_);
      batch.swap(threads_);  // one a worker starts meanwhile is in the next batch
    }
    if (batch.empty()) return;
    for (auto& t : batch) t.join();
  }
}

unsigned worker_set::threads() const {
  std::lock_guard lock(mutex_);
  return started_;
}

worker_set::wait_scope::wait_scope() : set_(current) {
  if (!set_) return;
  std::lock_guard lock(set_->mutex_);
  // Every other worker waits already: this wait needs one more to serve
  // whatever comes back meanwhile.
  if (set_->waiting_ + 1 >= set_->started_) {
    if (set_->started_ >= set_->most_ || !set_->launch_locked()) {
      ok_ = false;
      set_ = nullptr;
      return;
    }
  }
  ++set_->waiting_;
}

worker_set::wait_scope::~wait_scope() {
  if (!set_) return;
  std::lock_guard lock(set_->mutex_);
  --set_->waiting_;
}

}  // namespace uipc::plugin::detail
