// Connecting: find a live server of the point, check who it is, take the
// channel it offers, or wait for the point to appear.
#include <poll.h>
#include <sys/inotify.h>
#include <unistd.h>

#include <algorithm>
#include <random>

#include "bell.hpp"
#include "client_core.hpp"
#include "points_dir.hpp"
#include "uipc/proto/caps.pb.h"

namespace uipc::caps {

namespace {

using clock = std::chrono::steady_clock;

// Sleeps until something changes in the points directories (or the base, for
// a user directory not made yet), or `deadline`.
class point_waiter {
 public:
  error_code open(const std::string& base, uid_t uid) {
    fd_.reset(::inotify_init1(IN_NONBLOCK | IN_CLOEXEC));
    if (!fd_) return {errno, boost::system::system_category()};
    base_ = base;
    uid_ = uid;
    if (::inotify_add_watch(fd_.get(), base.c_str(), IN_CREATE | IN_MOVED_TO | IN_ONLYDIR) < 0) {
      return {errno, boost::system::system_category()};
    }
    watch_user_directory();
    return {};
  }

  void watch_user_directory() {
    if (user_watched_) return;
    const std::string dir = base_ + "/caps-" + std::to_string(uid_);
    // An instance counts once its info file is in place: it is then listening.
    user_watched_ =
        ::inotify_add_watch(fd_.get(), dir.c_str(), IN_MOVED_TO | IN_CREATE | IN_ONLYDIR) >= 0;
  }

  // False when the deadline passed.
  bool wait(clock::time_point deadline) {
    const auto now = clock::now();
    if (now >= deadline) return false;
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - now).count();
    pollfd p{fd_.get(), POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(std::min<long long>(left, 1 << 30))) > 0) {
      alignas(inotify_event) char buffer[4096];
      while (::read(fd_.get(), buffer, sizeof buffer) > 0) {
      }
    }
    watch_user_directory();
    return true;
  }

 private:
  unique_fd fd_;
  std::string base_;
  uid_t uid_ = 0;
  bool user_watched_ = false;
};

result<std::shared_ptr<detail::client_core>> take_channel(boost::asio::io_context& ctx,
                                                          const point_address& address,
                                                          const client_options& options,
                                                          blocking_connection ctrl,
                                                          clock::time_point deadline) {
  if (auto ec = check_server_uid(ctrl.peer(), address.uid)) return ec;
  auto first = ctrl.receive(deadline);  // a refusal arrives as an error here
  if (!first) return first.error();
  proto::caps::Welcome w;
  if (first->kind != frame_kind::notice || first->type != proto::caps::WELCOME ||
      first->fds.size() != 2 || !detail::is_bell(first->fds[1].get()) ||
      !w.ParseFromString(first->payload) || w.version() != detail::channel_version ||
      w.max_in_flight() == 0 || w.max_in_flight() > detail::max_in_flight_limit ||
      w.request_arena() > (std::uint64_t{1} << 32) || w.reply_arena() > (std::uint64_t{1} << 32)) {
    return make_error_code(errc::protocol_violation);
  }
  if (address.gid && *address.gid != w.gid()) return make_error_code(errc::wrong_gid);
  const auto layout = detail::channel_layout::of(w.request_arena(), w.reply_arena());
  if (layout.request_arena_size != w.request_arena() ||
      layout.reply_arena_size != w.reply_arena()) {
    return make_error_code(errc::protocol_violation);
  }
  auto segment =
      shm_segment::open_fd(std::move(first->fds[0]),
                           {detail::channel_magic, detail::channel_version}, layout.total + 4096);
  if (!segment) return segment.error();
  if (segment->size() < layout.total) return make_error_code(errc::protocol_violation);
  frame hello;
  hello.kind = frame_kind::notice;
  hello.type = proto::caps::HELLO;
  hello.payload = proto::caps::Hello().SerializeAsString();
  if (auto ec = ctrl.send(std::move(hello), deadline)) return ec;
  auto core = std::make_shared<detail::client_core>(
      ctx, options, std::move(ctrl), std::move(*segment), layout, std::move(first->fds[1]));
  core->registration.hold(core);
  core->generation = w.generation();
  core->gid = w.gid();
  core->max_in_flight = w.max_in_flight();
  boost::system::error_code ec;
  core->bell_desc.assign(::fcntl(core->bell.get(), F_DUPFD_CLOEXEC, 0), ec);
  if (ec) return ec;
  if (core->server_pidfd)
    core->pidfd_desc.assign(::fcntl(core->server_pidfd.get(), F_DUPFD_CLOEXEC, 0), ec);
  if (ec) return ec;
  return core;
}

}  // namespace

result<std::unique_ptr<client>> client::connect(boost::asio::io_context& ctx,
                                                const point_address& address,
                                                client_options options) {
  if (auto ec = check_name(address.name, point_name_rules)) return ec;
  auto base = detail::base_directory(address.directory);
  if (!base) return base.error();
  const auto deadline = clock::now() + options.wait_for_point;
  point_waiter waiter;
  if (options.wait_for_point.count() > 0) {
    if (auto ec = waiter.open(*base, address.uid)) return ec;
  }
  connection_options co;
  co.error_categories.push_back(&caps_category());
  thread_local std::minstd_rand pick{
      static_cast<unsigned>(::getpid()) ^
      static_cast<unsigned>(clock::now().time_since_epoch().count())};
  for (;;) {
    error_code refused;
    auto dir = detail::user_points_directory(*base, address.uid);
    if (!dir && dir.error() != make_error_code(errc::not_registered)) return dir.error();
    if (dir) {
      // Each new client goes to one of the servers of the name, at random.
      auto sockets = detail::instance_sockets(*dir, address.name);
      std::shuffle(sockets.begin(), sockets.end(), pick);
      for (const auto& path : sockets) {
        auto ctrl = blocking_connection::connect(path, co);
        if (!ctrl) {
          if (ctrl.error() == boost::system::errc::permission_denied)
            refused = make_error_code(uipc::errc::permission_denied);
          continue;  // refused or gone: a leftover of a dead server
        }
        auto core = take_channel(ctx, address, options, std::move(*ctrl),
                                 std::max(deadline, clock::now() + options.handshake_timeout));
        if (!core) {
          if (core.error() == make_error_code(errc::stopped) ||
              core.error() == boost::asio::error::eof ||
              core.error() == make_error_code(uipc::errc::peer_closed)) {
            continue;  // it was stopping: try another
          }
          return core.error();
        }
        return std::unique_ptr<client>(new client(std::move(*core)));
      }
    }
    if (refused) return refused;
    if (options.wait_for_point.count() <= 0 || !waiter.wait(deadline))
      return make_error_code(errc::not_registered);
  }
}

}  // namespace uipc::caps
