#include "caps_support.hpp"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

namespace uipc::caps::test {

std::span<const std::byte> bytes(std::string_view s) {
  return std::as_bytes(std::span(s.data(), s.size()));
}

loop_thread::loop_thread() : work_(ctx_.get_executor()), thread_([this] { ctx_.run(); }) {}

// The work already queued runs before the loop ends: a connection closed by
// a service's stop() completes its pending receive on the loop, and a close
// dropped with the io_context would leave the connection and the handler that
// holds it holding each other (a leak ASan reports). Bounded: a loop still
// busy after 2 s is stopped hard.
void loop_thread::pause() {
  ctx_.stop();
  thread_.join();
}

void loop_thread::resume() {
  ctx_.restart();
  thread_ = std::thread([this] { ctx_.run(); });
}

loop_thread::~loop_thread() {
  work_.reset();
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (!ctx_.stopped() && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  ctx_.stop();
  thread_.join();
}

responder::responder(service& s, answer_fn answer)
    : service_(s),
      answer_(
          answer ? std::move(answer)
                 : [](service& svc, const event& e) { (void)svc.reply(e.client, e.id, e.view()); }),
      thread_([this] {
        while (!stop_.load()) {
          auto e = service_.receive(in(20ms));
          if (!e) {
            if (e.error() == make_error_code(errc::stopped)) return;
            continue;
          }
          if (e->kind == event_kind::request) {
            ++requests_;
            answer_(service_, *e);
          } else if (e->kind == event_kind::dispose) {
            ++disposals_;
          }
        }
      }) {}

responder::~responder() {
  stop_ = true;
  thread_.join();
}

caps_test::caps_test() { ::chmod(dir_.path().c_str(), 01777); }

service_options caps_test::options() const {
  service_options o;
  o.directory = dir_.path();
  return o;
}

point_address caps_test::address(const std::string& name) const {
  point_address a;
  a.name = name;
  a.uid = ::geteuid();
  a.directory = dir_.path();
  return a;
}

result<std::unique_ptr<service>> caps_test::serve(const std::string& name, service_options o) {
  return service::register_point(loop_.ctx(), name, std::move(o));
}

result<std::unique_ptr<client>> caps_test::connect(const std::string& name, client_options o) {
  return client::connect(loop_.ctx(), address(name), o);
}

event caps_test::next_event(service& s, event_kind kind) {
  const auto until = in(5s);
  while (clock::now() < until) {
    auto e = s.receive(until);
    if (!e) break;
    if (e->kind == kind) return std::move(*e);
  }
  ADD_FAILURE() << "no event of kind " << static_cast<int>(kind);
  return {};
}

child_service::child_service(const std::string& name, service_options options,
                             std::function<void(service&, const child_service&)> serve,
                             const std::function<void()>& setup) {
  if (::pipe(pipe_) != 0) return;
  pid_ = ::fork();
  if (pid_ == 0) {
    if (setup) setup();
    boost::asio::io_context ctx;
    auto s = service::register_point(ctx, name, options);
    (void)::write(pipe_[1], s ? "y" : "n", 1);
    if (!s) ::_exit(1);
    // One thread only: a child forked from a threaded test process starts
    // none (the sanitizers' runtimes do not support it everywhere).
    if (serve) serve(**s, *this);
    ctx.run_for(std::chrono::seconds(60));
    ::pause();
    ::_exit(0);
  }
  char c = 0;
  registered_ = ::read(pipe_[0], &c, 1) == 1 && c == 'y';
}

child_service::~child_service() {
  kill();
  ::close(pipe_[0]);
  ::close(pipe_[1]);
}

void child_service::kill() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGKILL);
  ::waitpid(pid_, nullptr, 0);
  pid_ = -1;
}

void child_service::note() const { (void)::write(pipe_[1], "!", 1); }

bool child_service::wait_note() const {
  char c = 0;
  return ::read(pipe_[0], &c, 1) == 1 && c == '!';
}

int in_child(const std::function<int()>& body) {
  const pid_t child = ::fork();
  if (child == 0) {
    int status = 99;
    try {
      status = body();
    } catch (...) {
    }
    ::_exit(status);
  }
  return uipc::test::wait_exit(child, std::chrono::seconds(10));
}

}  // namespace uipc::caps::test
