// event_loop: io_context on N threads with signal handling and stop hooks.
#include "uipc/core/event_loop.hpp"

#include <atomic>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/signal_set.hpp>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

namespace uipc {

namespace asio = boost::asio;

struct event_loop::impl {
  explicit impl(unsigned n) : threads(n == 0 ? 1 : n), context(static_cast<int>(threads)) {}

  unsigned threads;
  asio::io_context context;
  std::optional<asio::signal_set> signals;
  std::atomic<int> stop_signal{0};
  std::atomic<bool> stopping{false};

  std::mutex hooks_mutex;
  std::vector<std::function<void()>> hooks;

  // run()'s work guard: released by stop() after the hooks, so run() returns
  // once everything the hooks started has finished, however many hops it takes.
  std::mutex run_mutex;
  std::condition_variable run_done;
  bool running = false;
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> work;
  std::chrono::milliseconds grace{2000};
  std::jthread watchdog;  // declared last: joined first when the loop goes

  void watch_signals() {
    signals->async_wait([this](const boost::system::error_code& ec, int signo) {
      if (ec) return;
      stop_signal.store(signo);
      begin_stop();
    });
  }

  void begin_stop() {
    if (stopping.exchange(true)) return;
    asio::post(context, [this] {
      std::vector<std::function<void()>> to_run;
      {
        std::lock_guard lock(hooks_mutex);
        to_run.swap(hooks);
      }
      for (auto it = to_run.rbegin(); it != to_run.rend(); ++it) (*it)();
      if (signals) signals->cancel();
      std::unique_lock lock(run_mutex);
      work.reset();
      // Whatever the hooks did not close (a connection someone still holds)
      // would keep run() forever: after the grace period, stop hard.
      watchdog = std::jthread([this] {
        std::unique_lock lock(run_mutex);
        if (!run_done.wait_for(lock, grace, [this] { return !running; })) context.stop();
      });
    });
  }
};

event_loop::event_loop(unsigned threads, bool catch_signals)
    : impl_(std::make_unique<impl>(threads)) {
  if (catch_signals) {
    impl_->signals.emplace(impl_->context, SIGINT, SIGTERM);
  }
}

event_loop::~event_loop() = default;

asio::io_context& event_loop::context() noexcept { return impl_->context; }

unsigned event_loop::threads() const noexcept { return impl_->threads; }

void event_loop::run() {
  auto& ctx = impl_->context;
  if (ctx.stopped()) ctx.restart();
  {
    std::lock_guard lock(impl_->run_mutex);
    impl_->work.emplace(ctx.get_executor());
    impl_->running = true;
  }
  if (impl_->signals) impl_->watch_signals();
  std::vector<std::jthread> extra;
  extra.reserve(impl_->threads - 1);
  for (unsigned i = 1; i < impl_->threads; ++i) extra.emplace_back([&ctx] { ctx.run(); });
  ctx.run();
  extra.clear();  // joins
  {
    std::lock_guard lock(impl_->run_mutex);
    impl_->running = false;
    impl_->work.reset();
  }
  impl_->run_done.notify_all();
  if (impl_->watchdog.joinable()) impl_->watchdog.join();
  impl_->stopping.store(false);
}

void event_loop::stop() { impl_->begin_stop(); }

void event_loop::set_stop_grace(std::chrono::milliseconds grace) {
  std::lock_guard lock(impl_->run_mutex);
  impl_->grace = grace;
}

void event_loop::on_stop(std::function<void()> hook) {
  std::lock_guard lock(impl_->hooks_mutex);
  impl_->hooks.push_back(std::move(hook));
}

int event_loop::stop_signal() const noexcept { return impl_->stop_signal.load(); }

}  // namespace uipc
