// Listing and watching points.
#include "uipc/caps/point.hpp"

#include <dirent.h>
#include <poll.h>
#include <sys/inotify.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <deque>
#include <map>

#include "points_dir.hpp"

namespace uipc::caps {
namespace {

// The users whose points directories are in `base`.
std::vector<std::pair<uid_t, std::string>> user_directories(const std::string& base) {
  std::vector<std::pair<uid_t, std::string>> out;
  DIR* d = ::opendir(base.c_str());
  if (d == nullptr) return out;
  while (const dirent* e = ::readdir(d)) {
    const std::string_view file = e->d_name;
    if (file.substr(0, 5) != "caps-" || file.size() == 5 || file.size() > 15) continue;
    const std::string_view digits = file.substr(5);
    if (!std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; }))
      continue;
    const auto uid = static_cast<uid_t>(std::stoull(std::string(digits)));
    auto dir = detail::user_points_directory(base, uid);
    if (dir)
      out.emplace_back(uid, std::move(*dir));  // someone else's "caps-<uid>" is not that user's
  }
  ::closedir(d);
  return out;
}

std::vector<point_info> live_points(const std::string& base) {
  std::vector<point_info> out;
  for (const auto& [uid, dir] : user_directories(base)) {
    for (const auto& socket : detail::all_instance_sockets(dir)) {
      auto info = detail::read_info(socket, uid);
      if (info && detail::instance_alive(socket, *info)) out.push_back(std::move(*info));
    }
  }
  std::sort(out.begin(), out.end(), [](const point_info& a, const point_info& b) {
    return std::tie(a.uid, a.name, a.socket_path) < std::tie(b.uid, b.name, b.socket_path);
  });
  return out;
}

}  // namespace

result<std::vector<point_info>> list_points(const std::string& directory) {
  auto base = detail::base_directory(directory);
  if (!base) return base.error();
  return live_points(*base);
}

result<std::string> points_directory(uid_t uid, const std::string& directory) {
  auto base = detail::base_directory(directory);
  if (!base) return base.error();
  return detail::user_points_directory(*base, uid);
}

struct point_watch::impl {
  std::string base;
  unique_fd inotify;
  std::map<std::string, int> watched;       // directory -> watch descriptor
  std::map<std::string, point_info> known;  // socket path -> info
  std::deque<point_event> pending;

  error_code watch_directories() {
    constexpr std::uint32_t dir_events =
        IN_CREATE | IN_DELETE | IN_MOVED_TO | IN_MOVED_FROM | IN_CLOSE_WRITE | IN_ONLYDIR;
    if (!watched.contains(base)) {
      const int wd =
          ::inotify_add_watch(inotify.get(), base.c_str(), IN_CREATE | IN_MOVED_TO | IN_ONLYDIR);
      if (wd < 0) return {errno, boost::system::system_category()};
      watched.emplace(base, wd);
    }
    for (const auto& [uid, dir] : user_directories(base)) {
      if (watched.contains(dir)) continue;
      const int wd = ::inotify_add_watch(inotify.get(), dir.c_str(), dir_events);
      if (wd >= 0) watched.emplace(dir, wd);
    }
    return {};
  }

  // Compares what lives now with what was known, queueing the differences.
  void rescan() {
    (void)watch_directories();
    std::map<std::string, point_info> now;
    for (auto& p : live_points(base)) now.emplace(p.socket_path, std::move(p));
    for (const auto& [path, info] : known) {
      if (!now.contains(path)) pending.push_back({point_event::kind::disappeared, info});
    }
    for (const auto& [path, info] : now) {
      if (!known.contains(path)) pending.push_back({point_event::kind::appeared, info});
    }
    known = std::move(now);
  }

  // Reads (and so discards) what the kernel queued.
  void drain() {
    alignas(inotify_event) char buffer[8192];
    while (::read(inotify.get(), buffer, sizeof buffer) > 0) {
    }
  }
};

result<point_watch> point_watch::open(const std::string& directory) {
  auto base = detail::base_directory(directory);
  if (!base) return base.error();
  auto p = std::make_unique<impl>();
  p->base = std::move(*base);
  p->inotify.reset(::inotify_init1(IN_NONBLOCK | IN_CLOEXEC));
  if (!p->inotify) return error_code(errno, boost::system::system_category());
  if (auto ec = p->watch_directories()) return ec;
  p->rescan();
  return point_watch(std::move(p));
}

point_watch::point_watch(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
point_watch::point_watch(point_watch&&) noexcept = default;
point_watch& point_watch::operator=(point_watch&&) noexcept = default;
point_watch::~point_watch() = default;

int point_watch::fd() const noexcept { return impl_->inotify.get(); }

result<point_event> point_watch::next(std::chrono::steady_clock::time_point deadline) {
  for (;;) {
    if (!impl_->pending.empty()) {
      point_event e = std::move(impl_->pending.front());
      impl_->pending.pop_front();
      return e;
    }
    const auto now = std::chrono::steady_clock::now();
    if (now >= deadline) return make_error_code(uipc::errc::timed_out);
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(deadline - now).count();
    pollfd p{impl_->inotify.get(), POLLIN, 0};
    const int n = ::poll(&p, 1,
                         deadline == std::chrono::steady_clock::time_point::max()
                             ? -1
                             : static_cast<int>(std::min<long long>(left, 1 << 30)));
    if (n < 0 && errno != EINTR) return error_code(errno, boost::system::system_category());
    if (n > 0) {
      impl_->drain();
      impl_->rescan();
    }
  }
}

}  // namespace uipc::caps
