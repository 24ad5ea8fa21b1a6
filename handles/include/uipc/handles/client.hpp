// The client facade of the handle daemon: named events, mutexes and semaphores
// shared between processes, as RAII objects.
#pragma once

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/execution/context.hpp>
#include <boost/asio/execution_context.hpp>
#include <boost/asio/query.hpp>
#include <boost/asio/system_context.hpp>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "uipc/core/error.hpp"
#include "uipc/handles/daemon.hpp"
#include "uipc/handles/error.hpp"
#include "uipc/handles/types.hpp"

namespace boost::asio::detail {
template <typename T, typename Blocking>
class promise_executor;  // use_future's (see handles::detail::on_system_context)
}  // namespace boost::asio::detail

namespace uipc::handles {

namespace detail {
struct session;
struct mapping;
struct segment_header;
struct slot;
struct wait_set;
/// A client's async waits and the one thread that sleeps for them (async_wait.cpp).
struct async_waiter;
struct async_wait_op;
struct async_waiter_deleter {
  /// Completes every pending async wait with operation_aborted and ends the thread.
  void operator()(async_waiter* w) const noexcept;
};
using async_waiter_ptr = std::unique_ptr<async_waiter, async_waiter_deleter>;
async_waiter_ptr make_async_waiter();

/// Whether an executor runs on Asio's system context, told by its type: asking
/// the system executor its context makes that context (a pool of threads).
template <class Executor>
struct on_system_context
    : std::is_same<std::decay_t<decltype(boost::asio::query(std::declval<const Executor&>(),
                                                            boost::asio::execution::context))>,
                   boost::asio::system_context> {};
/// use_future's executor says "execution_context&" and means the system one.
template <class T, class Blocking>
struct on_system_context<boost::asio::detail::promise_executor<T, Blocking>> : std::true_type {};

/// The context of `handler`'s associated executor, where the executor can say:
/// a wait pending when that context is destroyed goes with it (see
/// uipc/core/handler_store.hpp), its handler destroyed unrun. Null for Asio's
/// system context (plain callbacks, use_future), which lives as long as the
/// program.
template <class Handler>
boost::asio::execution_context* handler_context(const Handler& handler) {
  using executor = boost::asio::associated_executor_t<Handler>;
  if constexpr (!boost::asio::can_query_v<const executor&, boost::asio::execution::context_t>) {
    return nullptr;
  } else if constexpr (on_system_context<executor>::value) {
    return nullptr;
  } else {
    return &boost::asio::query(boost::asio::get_associated_executor(handler),
                               boost::asio::execution::context);
  }
}
}  // namespace detail

/// A timeout that never passes.
inline constexpr std::chrono::nanoseconds infinite{-1};

/// Most distinct objects that one client's pending async waits may watch at once
/// (futex_waitv sleeps on at most 128 words; the waiter thread keeps one).
inline constexpr std::size_t max_async_wait_objects = 127;

/// How a client finds (and, if need be, starts) its daemon.
struct client_options {
  location where;
  /// Start a daemon when none serves the location.
  bool autostart = true;
  /// The daemon program; empty: $UIPC_HANDLED_PATH, else "uipc-handled" beside
  /// the calling program, in the install prefix, then on $PATH (daemon_program()).
  /// A started daemon's standard streams go to /dev/null (stderr is kept when
  /// $UIPC_HANDLED_STDERR is set).
  std::string daemon_path;
  /// Options passed to a daemon this client starts.
  std::chrono::milliseconds daemon_linger{1000};
  std::uint32_t daemon_capacity = 1024;
  std::size_t daemon_scratch_size = 256 * 1024;
  /// How long connect() may take, starting a daemon included (the hello to a
  /// daemon that does not answer, e.g. a stopped one, included).
  std::chrono::milliseconds start_timeout{10000};
  /// How long a control call (create, open, close, list, ...) waits for the
  /// daemon's reply before it fails with errc::daemon_timeout.
  std::chrono::milliseconds call_timeout{5000};
  /// How long a wait spins on shared memory before it sleeps on a futex.
  std::chrono::nanoseconds spin{std::chrono::microseconds(50)};
};

/// A reference to a kernel object. Move-only; the destructor closes the reference
/// (a round trip to the daemon), and the object dies with its last reference in
/// any process. Threading: one object may be used from several threads at once
/// (waits, signals), but not moved or closed concurrently with that.
class object {
 public:
  object() = default;
  object(object&&) noexcept;
  object& operator=(object&&) noexcept;
  object(const object&) = delete;
  object& operator=(const object&) = delete;
  ~object();

  handle_id handle() const noexcept { return handle_; }
  object_type type() const noexcept { return type_; }
  /// create_*() found an object of that name and opened it instead.
  bool existed() const noexcept { return existed_; }
  explicit operator bool() const noexcept { return session_ != nullptr; }

  /// Waits until the object is signalled and takes it (an auto-reset event is
  /// reset, a semaphore's count drops by one, a mutex becomes the calling
  /// thread's). Runs in shared memory: no daemon round trip. Returns
  /// wait_status::abandoned for a mutex whose previous owner died holding it.
  /// Errors: errc::daemon_lost, errc::stale_handle, errc::invalid_handle (empty object).
  result<wait_status> wait(std::chrono::nanoseconds timeout = infinite) const;

  /// Drops this reference now (one round trip); afterwards the object is empty.
  /// errc::not_held / stale_handle if the daemon no longer counts it;
  /// daemon_lost after a restart. The destructor drops it too, but without
  /// waiting for the daemon's answer (requests are served in order, so the
  /// client's next request already sees it closed).
  error_code close();

  /// Gives the reference up without closing it: it stays counted for the client
  /// until client::close(handle) or the client's disconnect. The object is empty.
  handle_id detach() noexcept;

 protected:
  friend class client;
  object(std::shared_ptr<detail::session> s, handle_id h, object_type t, bool existed);
  /// This object's slot, checked (session, daemon, generation, type); null
  /// with `failure` set when it cannot be used.
  detail::slot* checked(object_type expected, error_code& failure) const noexcept;

  std::shared_ptr<detail::session> session_;
  // What every operation reads, each one load away from the object (session_
  // keeps them): the mapping, its segment's header, and this object's slot
  // (null: no usable handle).
  detail::mapping* map_ = nullptr;
  detail::segment_header* header_ = nullptr;
  detail::slot* slot_ = nullptr;
  handle_id handle_;
  object_type type_ = object_type::none;
  bool existed_ = false;
};

/// A manual- or auto-reset event. Signal, reset and release (here, on mutex
/// and semaphore) change a word in shared memory under a lock other processes
/// hold for a few instructions; one held for a second (a process stopped
/// there, or a client writing the shared segment) fails them with
/// errc::object_locked, nothing changed.
class event : public object {
 public:
  event() = default;
  /// Sets the event; wakes every waiter (manual) or one (auto). No round trip.
  error_code signal() const;
  /// Clears the event. No round trip.
  error_code reset() const;

 private:
  friend class client;
  explicit event(object&& o) : object(std::move(o)) {}
};

/// An owned, recursive mutex. wait() takes it (again, for the owner).
class mutex : public object {
 public:
  mutex() = default;
  /// Releases one level of ownership; errc::not_owner unless the calling thread owns it.
  error_code release() const;

 private:
  friend class client;
  explicit mutex(object&& o) : object(std::move(o)) {}
};

/// A counting semaphore with a maximum.
class semaphore : public object {
 public:
  semaphore() = default;
  /// Adds `count`; returns the count before. errc::semaphore_limit above the maximum.
  result<std::uint32_t> release(std::uint32_t count = 1) const;

 private:
  friend class client;
  explicit semaphore(object&& o) : object(std::move(o)) {}
};

/// A block of the segment's scratch area (zeroed when allocated), visible to every
/// client at the same offset. Move-only; the destructor frees it.
class scratch_block {
 public:
  scratch_block() = default;
  scratch_block(scratch_block&&) noexcept;
  scratch_block& operator=(scratch_block&&) noexcept;
  ~scratch_block();

  std::uint64_t offset() const noexcept { return offset_; }
  std::span<std::byte> data() const noexcept { return data_; }
  /// Frees the block now; errc::bad_scratch_offset if the daemon disagrees.
  error_code free();

 private:
  friend class client;
  std::shared_ptr<detail::session> session_;
  std::uint64_t offset_ = 0;
  std::span<std::byte> data_;
};

/// Kinds of event.
enum class event_reset { manual, automatic };

/// A connection to the handle daemon of a location, started if none serves.
///
/// Threading: every member may be called from any thread; calls that talk to
/// the daemon block for one round trip, run on the calling thread (the client
/// has no thread of its own; concurrent calls are serialized). If the daemon
/// dies, every wait on its objects fails with errc::daemon_lost (in every
/// process, within about a second even when it was killed with SIGKILL), and so
/// does every later call; connect() again (which starts a fresh daemon) to go on.
/// Lifetime: objects keep what they need alive, so they may outlive the client.
class client {
 public:
  /// Connects, starting a daemon if none serves and options.autostart is set.
  /// Of several clients racing, exactly one starts it. Errors:
  /// errc::daemon_unavailable, daemon_failed_to_start, daemon_start_timeout,
  /// daemon_timeout (a daemon serves but does not answer, e.g. a stopped one).
  static result<client> connect(client_options options = {});

  client(client&&) noexcept;
  client& operator=(client&&) noexcept;
  ~client();

  /// Creates an event, or opens the one already named `name` (existed() tells).
  result<event> create_event(event_reset reset, bool initially_signalled = false,
                             std::string_view name = {});
  /// Creates a mutex, owned by the calling thread if `initially_owned`.
  result<mutex> create_mutex(bool initially_owned = false, std::string_view name = {});
  result<semaphore> create_semaphore(std::uint32_t initial, std::uint32_t maximum,
                                     std::string_view name = {});

  result<event> open_event(std::string_view name);
  result<mutex> open_mutex(std::string_view name);
  result<semaphore> open_semaphore(std::string_view name);
  /// Opens any object by name or by handle (e.g. one passed from another process).
  result<object> open(std::string_view name);
  result<object> open(handle_id handle);
  /// Typed views of an opened object; errc::wrong_type otherwise.
  static result<event> as_event(object&& o);
  static result<mutex> as_mutex(object&& o);
  static result<semaphore> as_semaphore(object&& o);

  /// Drops one reference the client holds on `handle` (e.g. a detached one).
  /// errc::not_held when it holds none: a reference belongs to the client that
  /// took it, and nobody else can drop it.
  error_code close(handle_id handle);

  /// Allocates a zeroed block of at least `bytes` in the scratch area.
  result<scratch_block> store_scratch(std::size_t bytes);
  /// The whole scratch area (to read a block another process names by offset).
  std::span<std::byte> scratch_area() const;

  /// Waits until any one of `objects` is signalled and takes that one (the
  /// lowest position when several are). All objects must come from this client.
  result<wait_result> wait_any(std::span<const object* const> objects,
                               std::chrono::nanoseconds timeout = infinite);
  result<wait_result> wait_any(std::initializer_list<const object*> objects,
                               std::chrono::nanoseconds timeout = infinite);
  /// Waits until every one of `objects` is signalled and takes them all at once:
  /// nothing is taken until all can be. Duplicates are errc::invalid_argument.
  result<wait_result> wait_all(std::span<const object* const> objects,
                               std::chrono::nanoseconds timeout = infinite);
  result<wait_result> wait_all(std::initializer_list<const object*> objects,
                               std::chrono::nanoseconds timeout = infinite);

  /// Every object, fetched page by page (each page a snapshot of its slots).
  /// Like every control call: errc::daemon_timeout after options.call_timeout.
  result<std::vector<handle_info>> list();
  result<daemon_stats> stats();
  /// Every client connected to the daemon (this one included).
  result<std::vector<client_info>> clients();

  /// Waits on the event loop: completes when `o` is signalled and taken, as
  /// object::wait would, with void(error_code, wait_status); wait_status::timed_out
  /// when `timeout` passes first (infinite: never). No loop thread ever blocks:
  /// one thread per client (started by the first async wait, ended with the
  /// client) sleeps on the futexes of every pending async wait, and each take
  /// runs as a non-blocking wait on the completion handler's associated
  /// executor, just before the handler is invoked there. So a mutex belongs to
  /// the thread that runs the handler: release it there (in a coroutine, before
  /// it moves to another thread). A handler without an executor of its own
  /// (use_future, a plain callback: Asio's system executor) runs on the client's
  /// waiter thread instead, which may not own mutexes: a set with a mutex then
  /// completes with errc::invalid_argument, taking nothing.
  ///
  /// Cancellation (any type, through the handler's cancellation slot) completes
  /// with boost::asio::error::operation_aborted and takes nothing; a cancel that
  /// arrives after the take has lost, and the wait completes as signalled.
  /// Destroying (or assigning to) the client completes every pending async wait
  /// with operation_aborted. A wait whose executor's context (an io_context, a
  /// thread_pool) is destroyed first goes with that context, its handler
  /// destroyed unrun, as Asio's own operations are (a coroutine that owns the
  /// client it waits through goes too); an executor that cannot name its
  /// context must outlive the waits, and so must one that blocks in execute
  /// (blocking.always). Errors as
  /// object::wait (errc::daemon_lost within about a second of the daemon's
  /// death, stale_handle when the object's slot is closed under the wait), and
  /// errc::invalid_argument when the client's pending async waits would watch
  /// more than max_async_wait_objects distinct objects. `o` is read when the
  /// operation starts and may be destroyed afterwards.
  template <class Token>
  auto async_wait(const object& o, std::chrono::nanoseconds timeout, Token&& token) {
    return boost::asio::async_initiate<Token, void(error_code, wait_status)>(
        [this](auto handler, const object* target, std::chrono::nanoseconds t) {
          auto* context = detail::handler_context(handler);
          start_async_wait(*target, t, context, async_wait_handler(std::move(handler)));
        },
        token, &o, timeout);
  }
  /// wait_any on the event loop, completing with void(error_code, wait_result).
  /// As async_wait; `objects` is read when the operation starts.
  template <class Token>
  auto async_wait_any(std::span<const object* const> objects, std::chrono::nanoseconds timeout,
                      Token&& token) {
    return boost::asio::async_initiate<Token, void(error_code, wait_result)>(
        [this](auto handler, std::span<const object* const> set, std::chrono::nanoseconds t) {
          auto* context = detail::handler_context(handler);
          start_async_wait_many(set, false, t, context,
                                async_wait_many_handler(std::move(handler)));
        },
        token, objects, timeout);
  }
  /// wait_all on the event loop: takes nothing until it can take every object.
  template <class Token>
  auto async_wait_all(std::span<const object* const> objects, std::chrono::nanoseconds timeout,
                      Token&& token) {
    return boost::asio::async_initiate<Token, void(error_code, wait_result)>(
        [this](auto handler, std::span<const object* const> set, std::chrono::nanoseconds t) {
          auto* context = detail::handler_context(handler);
          start_async_wait_many(set, true, t, context, async_wait_many_handler(std::move(handler)));
        },
        token, objects, timeout);
  }

  /// The daemon's pid; whether it is still there (false once its process is
  /// gone, even killed with SIGKILL and with nobody waiting: the daemon's
  /// death flag in the segment, which the kernel marks as the process dies).
  std::int32_t daemon_pid() const noexcept;
  bool connected() const noexcept;

 private:
  explicit client(std::shared_ptr<detail::session> s);
  result<object> create(object_type type, std::string_view name, bool initial, std::uint32_t count,
                        std::uint32_t maximum);
  result<wait_result> wait_many(std::span<const object* const> objects, bool all,
                                std::chrono::nanoseconds timeout);
  /// Checks a wait set and resolves its slots (sorted by slot for a wait-all:
  /// one lock order for every wait-all, so two never deadlock). Shared by the
  /// blocking and the async waits, so both refuse the same sets the same way.
  error_code build_wait_set(std::span<const object* const> objects, bool all,
                            detail::wait_set& out) const;

  using async_wait_handler = boost::asio::any_completion_handler<void(error_code, wait_status)>;
  using async_wait_many_handler =
      boost::asio::any_completion_handler<void(error_code, wait_result)>;
  /// `context`: the handler's executor's, where it has one (detail::handler_context).
  void start_async_wait(const object& o, std::chrono::nanoseconds timeout,
                        boost::asio::execution_context* context, async_wait_handler handler);
  void start_async_wait_many(std::span<const object* const> objects, bool all,
                             std::chrono::nanoseconds timeout,
                             boost::asio::execution_context* context,
                             async_wait_many_handler handler);
  void start_async(std::span<const object* const> objects, bool all,
                   std::chrono::nanoseconds timeout, boost::asio::execution_context* context,
                   std::shared_ptr<detail::async_wait_op> op);

  std::shared_ptr<detail::session> session_;
  /// Declared last, so destroyed first: pending async waits end before the session.
  detail::async_waiter_ptr async_waiter_ = detail::make_async_waiter();
};

}  // namespace uipc::handles
