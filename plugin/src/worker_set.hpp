// The threads that serve a caps point for a host (a runner's point, or a
// host's point for its runner), growing while calls nest.
//
// A worker that calls into another process (an isolated plug-in's service,
// or the host's from a runner) may be waiting for a call that comes back to
// its own point: A -> host -> A needs a second worker in A while the first
// waits. So before such a wait, a set whose other workers all wait already
// starts one more; at its most it refuses the call (UIPC_PLUGIN_E_TOO_MANY)
// rather than let every worker wait for itself.
#pragma once

#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace uipc::plugin::detail {

class worker_set {
 public:
  /// `serve` runs on each worker until it returns (when the point stops).
  worker_set(unsigned first, unsigned most, std::function<void()> serve);
  ~worker_set();
  worker_set(const worker_set&) = delete;
  worker_set& operator=(const worker_set&) = delete;

  /// Starts the first workers.
  void start();
  /// Waits for every worker, those started meanwhile included (they end when
  /// the point stops).
  void join();
  unsigned threads() const;

  /// Around a wait on another process, on any thread: a worker of a set
  /// leaves one not waiting (starting it if need be); ok() is false when the
  /// set is at its most and the call must be refused. Other threads: always ok.
  class wait_scope {
   public:
    wait_scope();
    ~wait_scope();
    wait_scope(const wait_scope&) = delete;
    wait_scope& operator=(const wait_scope&) = delete;
    bool ok() const noexcept { return ok_; }

   private:
    worker_set* set_;
    bool ok_ = true;
  };

 private:
  bool launch_locked() noexcept;
  void run();

  std::function<void()> serve_;
  const unsigned first_, most_;
  mutable std::mutex mutex_;
  std::vector<std::thread> threads_;
  unsigned started_ = 0;  // threads ever started (the vector gives them up to join())
  unsigned waiting_ = 0;
};

}  // namespace uipc::plugin::detail
