// The event loop every module runs on: one io_context, N threads, orderly stop.
#pragma once

#include <chrono>
#include <functional>
#include <memory>

namespace boost::asio {
class io_context;
}

namespace uipc {

/// Owns one boost::asio::io_context and runs it on a fixed number of threads.
/// All modules in a process share one loop; each facade takes it (or its
/// context) in its constructor, and the loop must outlive them.
///
/// Threading: run() blocks the calling thread and uses it as one of the
/// threads; stop() and on_stop() may be called from any thread, also from a
/// handler running on the loop.
class event_loop {
 public:
  /// threads >= 1. With catch_signals, SIGINT and SIGTERM stop the loop in order.
  explicit event_loop(unsigned threads = 1, bool catch_signals = false);
  ~event_loop();
  event_loop(const event_loop&) = delete;
  event_loop& operator=(const event_loop&) = delete;

  /// The io_context: get its executor for sockets, timers and strands.
  boost::asio::io_context& context() noexcept;

  /// The number of threads run() uses.
  unsigned threads() const noexcept;

  /// Runs the loop on threads() threads until stop() (or a caught signal);
  /// returns once every thread has left the loop. May be called again after.
  void run();

  /// Orderly stop: runs the stop hooks (newest first) on the loop, then lets
  /// run() return as soon as the work they ended has finished (every completion
  /// they caused has run), or after the grace period if something still waits.
  /// Idempotent.
  void stop();

  /// How long stop() waits for outstanding work before it stops hard (default 2 s).
  void set_stop_grace(std::chrono::milliseconds grace);

  /// Registers a hook that stop() runs on the loop, e.g. to close an acceptor.
  void on_stop(std::function<void()> hook);

  /// The signal that stopped the loop, or 0.
  int stop_signal() const noexcept;

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

}  // namespace uipc
