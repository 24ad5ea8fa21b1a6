// event_loop: io_context on N threads with signal handling and stop hooks.
#include "uipc/core/event_loop.hpp"

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/signal_set.hpp>

#include <atomic>
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
      // Completions the hooks caused (cancelled reads, closes) are already queued;
      // stopping from a handler posted behind them lets them run first.
      asio::post(context, [this] { context.stop(); });
    });
  }
};

event_loop::event_loop(unsigned threads, bool catch_signals) : impl_(std::make_unique<impl>(threads)) {
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
  auto work = asio::make_work_guard(ctx);
  if (impl_->signals) impl_->watch_signals();
  std::vector<std::jthread> extra;
  extra.reserve(impl_->threads - 1);
  for (unsigned i = 1; i < impl_->threads; ++i) extra.emplace_back([&ctx] { ctx.run(); });
  ctx.run();
  extra.clear();  // joins
  impl_->stopping.store(false);
}

void event_loop::stop() { impl_->begin_stop(); }

void event_loop::on_stop(std::function<void()> hook) {
  std::lock_guard lock(impl_->hooks_mutex);
  impl_->hooks.push_back(std::move(hook));
}

int event_loop::stop_signal() const noexcept { return impl_->stop_signal.load(); }

}  // namespace uipc
