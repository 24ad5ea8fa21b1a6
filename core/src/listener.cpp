// listener: binds a Unix socket path safely and accepts framed connections.
//
// Taking a path: a lock file beside the socket (listener_lock_path(), an
// instance_lock) is held for the listener's whole life. Whoever holds it owns
// the path, so a second listener is refused at once, and a server that died (even by SIGKILL)
// released it with its last descriptor: its socket file is then stale and is
// replaced. A socket file without a lock holder is probed with connect() before
// it is removed, in case a program outside uipc serves it.
//
// A socket passed by the service manager (socket activation) is taken with the
// same lock, but its file is the manager's: never cleared, chmod-ed or removed.
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <boost/asio/append.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <cerrno>
#include <cstring>

#include "passed_sockets.hpp"
#include "uipc/core/framed.hpp"
#include "uipc/core/process.hpp"
#include "uipc/core/rendezvous.hpp"

namespace uipc {

namespace asio = boost::asio;
using stream_protocol = asio::local::stream_protocol;

namespace {

error_code last_error() { return {errno, boost::system::system_category()}; }

result<sockaddr_un> address_of(const std::string& path) {
  sockaddr_un addr{};
  if (path.empty() || path.size() >= sizeof addr.sun_path)
    return error_code(ENAMETOOLONG, boost::system::system_category());
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.data(), path.size());
  return addr;
}

// With the lock held: removes a stale socket file, refuses anything else.
error_code clear_path(const std::string& path, const sockaddr_un& addr) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return errno == ENOENT ? error_code{} : last_error();
  if (!S_ISSOCK(st.st_mode)) return make_error_code(errc::not_a_socket);
  unique_fd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!probe) return last_error();
  if (::connect(probe.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) ==
      0) {  // NOLINT: sockets API
    return make_error_code(errc::address_in_use);
  }
  if (errno != ECONNREFUSED && errno != ENOENT) return last_error();
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) return last_error();
  return {};
}

// With the lock held: a new listening socket bound to `path` (a stale file
// cleared first), with the options' mode and backlog; `st` gets the socket
// file's identity, so that close() removes only that file.
result<unique_fd> listen_at(const std::string& path, const sockaddr_un& addr,
                            const listener_options& options, struct stat& st) {
  if (auto ec = clear_path(path, addr)) return ec;
  unique_fd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return last_error();
  if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&addr), sizeof addr) !=
      0) {  // NOLINT: sockets API
    return last_error();
  }
  // Nobody can connect before listen(), so setting the mode between the two
  // leaves no window; AT_SYMLINK_NOFOLLOW refuses a symlink swapped in meanwhile.
  if (::fchmodat(AT_FDCWD, path.c_str(), options.mode & 0777, AT_SYMLINK_NOFOLLOW) != 0 ||
      ::lstat(path.c_str(), &st) != 0 || !S_ISSOCK(st.st_mode) ||
      ::listen(fd.get(), options.backlog) != 0) {
    auto ec = last_error();
    ::unlink(path.c_str());
    return ec ? ec : make_error_code(errc::not_a_socket);
  }
  return fd;
}

}  // namespace

struct listener::impl {
  impl(asio::io_context& c, std::string p, listener_options o, instance_lock lock)
      : ctx(c), path(std::move(p)), options(std::move(o)), lock(std::move(lock)), acceptor(c) {}

  asio::io_context& ctx;
  std::string path;
  listener_options options;
  instance_lock lock;
  stream_protocol::acceptor acceptor;
  ino_t socket_inode = 0;
  dev_t socket_device = 0;
  bool owns_file = true;  // false: the service manager's socket, left in place
  bool closed = false;
  fork_guard fork;  // a forked child's copy leaves the file alone
};

result<std::unique_ptr<listener>> listener::bind(asio::io_context& ctx, const std::string& path,
                                                 listener_options options) {
  auto addr = address_of(path);
  if (!addr) return addr.error();
  // An error from here on releases the lock, which removes its file: nothing
  // is left behind.
  auto lock = instance_lock::try_acquire(listener_lock_path(path));
  if (!lock) return lock.error();
  unique_fd fd;
  if (options.inherited) fd = detail::take_inherited_listener(path);
  const bool passed = static_cast<bool>(fd);
  struct stat st {};  // our own socket file's identity; none for a passed one
  if (!passed) {
    auto own = listen_at(path, *addr, options, st);
    if (!own) return own.error();
    fd = std::move(*own);
  }

  auto p = std::make_unique<impl>(ctx, path, std::move(options), std::move(*lock));
  p->owns_file = !passed;
  p->socket_inode = st.st_ino;
  p->socket_device = st.st_dev;
  boost::system::error_code ec;
  p->acceptor.assign(stream_protocol(), fd.get(), ec);
  if (ec) {
    if (!passed) ::unlink(path.c_str());
    return ec;
  }
  fd.release();
  return std::unique_ptr<listener>(
      new listener(std::move(p)));  // NOLINT(cppcoreguidelines-owning-memory): private constructor
}

listener::listener(std::unique_ptr<impl> p) : impl_(std::move(p)) {}

listener::~listener() { close(); }

void listener::start_accept(accept_handler handler) {
  // The handler may run after the listener is gone (an accept that completed
  // just before close()), so it holds what it needs itself, not `this`.
  impl_->acceptor.async_accept(
      [&ctx = impl_->ctx, options = impl_->options.connection, handler = std::move(handler)](
          error_code ec, stream_protocol::socket s) mutable {
        connection::pointer accepted;
        if (!ec) {
          unique_fd fd(s.release(ec));
          if (!ec) {
            auto c = connection::adopt(ctx, std::move(fd), std::move(options));
            if (c)
              accepted = std::move(*c);
            else
              ec = c.error();
          }
        }
        asio::dispatch(s.get_executor(), asio::append(std::move(handler), ec, std::move(accepted)));
      });
}

void listener::start_accept_socket(socket_handler handler) {
  impl_->acceptor.async_accept(
      [handler = std::move(handler)](error_code ec, stream_protocol::socket s) mutable {
        unique_fd fd;
        if (!ec) fd.reset(s.release(ec));
        if (!ec && ::fcntl(fd.get(), F_SETFD, FD_CLOEXEC) != 0) ec = last_error();
        if (ec) fd.reset();
        asio::dispatch(s.get_executor(), asio::append(std::move(handler), ec, std::move(fd)));
      });
}

void listener::close() {
  if (impl_->closed) return;
  impl_->closed = true;
  boost::system::error_code ignored;
  if (!impl_->owns_file) {
    // The manager's socket goes back to the passed set, open, for the next
    // listener of the path in this process; a pending accept is aborted.
    const int fd = impl_->acceptor.release(ignored);
    if (!ignored) detail::return_inherited_listener(unique_fd(fd));
  }
  impl_->acceptor.close(ignored);
  // Remove the socket file only if it is still ours, then the lock (which
  // removes its file while still holding it).
  struct stat st {};
  if (impl_->owns_file && !impl_->fork.forked_copy() && ::lstat(impl_->path.c_str(), &st) == 0 &&
      st.st_ino == impl_->socket_inode && st.st_dev == impl_->socket_device) {
    ::unlink(impl_->path.c_str());
  }
  impl_->lock.release();
}

const std::string& listener::path() const noexcept { return impl_->path; }

}  // namespace uipc
