// Rendezvous points: where a caps service and its clients meet. A point is
// (name, uid, gid); its files live in the shared rendezvous directory, in a
// directory of the owner's uid that nobody else can write.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "uipc/caps/error.hpp"
#include "uipc/core/rendezvous.hpp"

namespace uipc::caps {

/// Point names: letters, digits, '_' and '.', 1 to 63 bytes.
inline constexpr name_rules point_name_rules{1, 63, "_."};

/// A client of a service: the server's session id, unique in its life.
using client_id = std::uint64_t;
/// A message of a client: chosen by the client, unique among its messages in flight.
using message_id = std::uint64_t;

/// Who may connect to a point (the kernel's credentials of the client decide).
enum class access : std::uint8_t {
  user,   ///< the owner's uid only
  group,  ///< also every process in the point's group (primary or supplementary)
  world,  ///< everyone
};

/// What a client asks for: the point `name` of user `uid`, optionally of group `gid`.
struct point_address {
  std::string name;
  uid_t uid;                 ///< whose point (the server must run as this uid)
  std::optional<gid_t> gid;  ///< when set, the point's group must be this one
  /// Where points live; empty: the shared rendezvous directory
  /// ($UIPC_SHARED_DIR, else /tmp/uipc-shared).
  std::string directory;
};

/// One live server of a point, as list_points() and point_watch report it.
struct point_info {
  std::string name;
  uid_t uid = 0;
  gid_t gid = 0;
  access who = access::user;
  bool exclusive = true;
  pid_t pid = 0;                 ///< the server's process
  std::uint64_t generation = 0;  ///< changes when the server restarts
  std::uint64_t clients = 0;     ///< connected clients when the server last said
  std::string socket_path;
};

/// The live servers of every point in `directory` (empty: the shared one),
/// of every user. Leftovers of dead servers are not listed.
result<std::vector<point_info>> list_points(const std::string& directory = {});

/// The directory of `uid`'s points inside `directory` (empty: the shared one).
result<std::string> points_directory(uid_t uid, const std::string& directory = {});

/// A point appearing or disappearing.
struct point_event {
  enum class kind : std::uint8_t { appeared, disappeared } what;
  point_info point;
};

/// Watches points come and go (anyone may), by directory notification: no
/// polling, no CPU while nothing changes. A server killed with SIGKILL shows
/// as disappeared when the kernel closes its files.
///
/// Threading: one thread at a time.
class point_watch {
 public:
  /// Starts watching; the points live now are reported first, as appeared.
  static result<point_watch> open(const std::string& directory = {});
  point_watch(point_watch&&) noexcept;
  point_watch& operator=(point_watch&&) noexcept;
  ~point_watch();

  /// The next change, waiting until `deadline` (errc::timed_out from core then).
  result<point_event> next(std::chrono::steady_clock::time_point deadline);
  /// A descriptor that becomes readable when next() may have something (for an event loop).
  int fd() const noexcept;

  struct impl;

 private:
  explicit point_watch(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

}  // namespace uipc::caps
