// The dispatcher's internals: sockets, parties, queues, ID allocation, batching.
#pragma once

#include <sys/socket.h>

#include <array>
#include <atomic>
#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/container/static_vector.hpp>
#include <cerrno>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

#include "exclusive.hpp"
#include "uipc/core/buffer_pool.hpp"
#include "uipc/core/handler_store.hpp"
#include "uipc/dispatch/dispatcher.hpp"

namespace uipc::dispatch::detail {

class party;

/// An address and port in a fixed form, for hashing.
struct peer_key {
  std::array<std::uint8_t, 16> address{};
  std::uint16_t port = 0;
  bool v6 = false;
  std::uint32_t scope = 0;  // IPv6 scope id: fe80::1%eth0 and fe80::1%eth1 are different peers
  bool operator==(const peer_key&) const = default;
  static peer_key of(const udp::endpoint& ep) noexcept;
};

/// A live response's identity: (peer, ID).
struct id_key {
  peer_key peer;
  std::uint16_t id = 0;
  bool operator==(const id_key&) const = default;
};

struct peer_key_hash {
  std::size_t operator()(const peer_key& k) const noexcept;
};
struct id_key_hash {
  std::size_t operator()(const id_key& k) const noexcept;
};

/// A first-in first-out queue over one vector: unlike std::deque, which
/// allocates and frees a block every few elements as it goes round, it
/// allocates only when it grows past its largest size so far (the hot paths
/// push and pop one element per datagram).
template <class T>
class fifo {
 public:
  bool empty() const noexcept { return head_ == items_.size(); }
  std::size_t size() const noexcept { return items_.size() - head_; }
  T& front() noexcept { return items_[head_]; }
  T& operator[](std::size_t i) noexcept { return items_[head_ + i]; }
  T* begin() noexcept { return items_.data() + head_; }
  T* end() noexcept { return items_.data() + items_.size(); }
  /// May throw (bad_alloc) when it must grow; the queue is then unchanged.
  void push_back(T&& item) {
    if (items_.size() == items_.capacity() && head_ != 0) compact();
    items_.push_back(std::move(item));
  }
  void pop_front() noexcept {
    items_[head_++] = T{};  // what the element owns (a buffer) goes back now
    if (head_ == items_.size()) clear();
  }
  void clear() noexcept {
    items_.clear();
    head_ = 0;
  }
  void swap(fifo& other) noexcept {
    items_.swap(other.items_);
    std::swap(head_, other.head_);
  }

 private:
  // Moves the live elements to the front: no allocation (the capacity stays).
  void compact() noexcept {
    std::move(items_.begin() + static_cast<std::ptrdiff_t>(head_), items_.end(), items_.begin());
    items_.erase(items_.end() - static_cast<std::ptrdiff_t>(head_), items_.end());
    head_ = 0;
  }
  std::vector<T> items_;
  std::size_t head_ = 0;
};

/// A received datagram that waits in a queue; it becomes an event when delivered.
struct queued_message {
  pooled_buffer buffer;
  std::size_t size = 0;
  udp::endpoint peer;
  std::uint16_t id = 0;
  std::uint8_t socket = 0;
};

/// The responses that share one timeout duration, by deadline: since they were
/// linked in time order, the head is always the first to expire.
struct timeout_list {
  std::chrono::steady_clock::duration duration{};
  party* head = nullptr;
  party* tail = nullptr;
};

/// A response or a listener: what the handle, and each event it holds, refer to.
/// Fields below `refs_` are guarded by the engine's mutex.
class party {
 public:
  enum class role : std::uint8_t { response, listener };
  party(engine& e, ref_ptr<dispatcher> owner, role r) noexcept
      : engine_(&e), owner_(std::move(owner)), role_(r) {}

  std::atomic<std::uint32_t> refs_{1};
  engine* engine_;
  ref_ptr<dispatcher> owner_;  // the party's reference on the dispatcher
  role role_;
  bool attached_ = true;
  bool lent_ = false;  // an event is out with the application
  bool shutdown_delivered_ = false;
  bool idle_ = false;                  // listed in engine::idle_listeners_
  receive_handler waiter_;             // a pending async_receive
  bool waiter_loop_executor_ = false;  // it has no executor of its own (see invoke)
  error_code pending_;  // timed_out (responses) or no_buffers (listeners), not yet delivered
  std::vector<queued_message>
      queue_;  // responses: replies waiting (short: bounded, and no allocation when empty)
  // Responses only:
  udp::endpoint peer_;
  port_mode mode_ = port_mode::shared;
  std::uint16_t local_port_ = 0;
  // Exclusive ports only: the socket (until detach), its place in
  // engine::exclusive_, and the socket's error that ended the transaction.
  std::shared_ptr<exclusive_socket> exclusive_;
  std::size_t exclusive_slot_ = 0;
  error_code failed_;
  bool failure_delivered_ = false;
  // Exclusive ports: a reply was queued, and datagrams sent; one of each lets
  // the port be kept for the next response (engine::keep_exclusive_locked).
  bool answered_ = false;
  std::uint32_t exclusive_sends_ = 0;
  id_key key_;
  std::uint64_t serial_ = 0;
  // The response's place in its timeout_list, while its timeout runs.
  std::chrono::steady_clock::time_point deadline_;
  timeout_list* timeouts_ = nullptr;
  party* earlier_ = nullptr;
  party* later_ = nullptr;
};

void add_ref(party* p) noexcept;
void release(party* p) noexcept;

/// A finished receive, to be completed outside the lock.
struct completion {
  completion() = default;
  completion(completion&&) noexcept = default;
  // Deleted: Boost 1.81's any_completion_handler move assignment recurses
  // without end (see outgoing below), so completions are only ever built in
  // place or moved into new storage.
  completion& operator=(completion&&) = delete;
  completion(const completion&) = delete;
  completion& operator=(const completion&) = delete;
  ~completion() = default;

  receive_handler handler;
  error_code ec;
  event ev;
  bool loop_executor = false;  // the handler has no executor of its own
};

/// A datagram waiting to be sent.
struct outgoing {
  outgoing() = default;
  outgoing(const udp::endpoint& destination, const std::byte* bytes, std::size_t length,
           pooled_buffer owned, send_handler completion) noexcept
      : to(destination), data(bytes), size(length), buffer(std::move(owned)) {
    handler.swap(completion);
  }
  outgoing(outgoing&&) noexcept = default;
  // By hand: Boost 1.81's any_completion_handler move assignment wraps the
  // source in a new handler instead of taking it over; swap does take it over.
  outgoing& operator=(outgoing&& other) noexcept {
    to = other.to;
    data = other.data;
    size = other.size;
    buffer = std::move(other.buffer);
    handler = nullptr;
    handler.swap(other.handler);
    return *this;
  }
  outgoing(const outgoing&) = delete;
  outgoing& operator=(const outgoing&) = delete;
  ~outgoing() = default;

  udp::endpoint to;
  const std::byte* data = nullptr;
  std::size_t size = 0;
  pooled_buffer buffer;  // owned bytes (reply, send copy), returned after sending
  send_handler handler;  // async sends only
};

class engine;

/// One socket of the group, its batch arrays and its send queue. Every use of
/// the asio socket object and of the send queue is under io_mutex.
struct socket_state {
  explicit socket_state(boost::asio::io_context& ctx) : socket(ctx) {}
  socket_state(const socket_state&) = delete;
  socket_state& operator=(const socket_state&) = delete;
  ~socket_state();
  udp::socket socket;
  int fd = -1;
  // The separate send socket (dispatcher_options::separate_send_sockets), or
  // -1: not in any epoll set, so that sending costs no epoll callback. Under io_mutex.
  int send_fd = -1;
  std::uint8_t index = 0;
  const engine* owner = nullptr;
  std::mutex io_mutex;
  bool closed = false;
  bool write_wait = false;
  bool flush_posted = false;
  fifo<outgoing> send_queue;
  // Replies made inside this socket's receive batch by the thread running it:
  // no lock per reply; touched only by that thread, whose flush at the batch's
  // end sends them or hands them to the send queue.
  std::vector<outgoing> batch_replies;
  // Receive side: touched only by the one receive running on this socket.
  std::vector<pooled_buffer> buffers;
  std::vector<mmsghdr> headers;
  std::vector<iovec> vectors;
  std::vector<sockaddr_storage> addresses;
  std::vector<completion> delivered;  // a batch's completions (kept: its capacity is reused)
  std::size_t receive_hint = 0;       // buffers for a wake-up's first read (0: max_receives)
  // Send side, under io_mutex.
  std::vector<mmsghdr> send_headers;
  std::vector<iovec> send_vectors;
  std::vector<pooled_buffer> spent_buffers;  // a sendmmsg's sent buffers, given back together
  bool receiving = false;                    // guarded by the engine's mutex
};

/// What a flush did: completions to post, buffers given back, a socket error.
struct send_results {
  struct done_send {
    send_handler handler;
    error_code ec;
  };
  std::vector<done_send> done;
  std::uint32_t returned = 0;
  error_code socket_error;
};

/// Sockets to arm after a restart decision: at most 64 (dispatcher::create
/// refuses more), kept on the stack, so that deciding never allocates (a
/// bad_alloc there would leave a socket marked receiving and never armed).
using sockets_to_arm = boost::container::static_vector<socket_state*, 64>;

class engine final : public std::enable_shared_from_this<engine>, handler_store {
 public:
  engine(boost::asio::io_context& ctx, const dispatcher_options& options,
         std::unique_ptr<buffer_pool> pool);
  ~engine();
  engine(const engine&) = delete;
  engine& operator=(const engine&) = delete;

  /// The context is going with handlers stored here never run: the parties'
  /// receives, the sends queued on the sockets, the port waiters (see
  /// handler_store.hpp).
  void drop_handlers() noexcept override;
  /// Once a shared_ptr owns the engine (see handler_registration::hold).
  void hold_registration() noexcept { registration_.hold(weak_from_this()); }

  result<void> open(const udp::endpoint& local);
  void set_port_range(std::uint16_t first, std::uint16_t last, std::uint32_t recent) {
    ports_.emplace(first, last, recent);
  }
  /// Steers the port's datagrams to the receiving sockets, then opens the
  /// separate send sockets (dispatcher_options::separate_send_sockets).
  result<void> open_send_sockets();
  void close() noexcept;

  result<response> add_response(dispatcher& owner, const udp::endpoint& peer,
                                const response_options& options);
  result<listener> add_listener(dispatcher& owner);
  void start_add_response(dispatcher& owner, const udp::endpoint& peer,
                          const response_options& options,
                          boost::asio::any_completion_handler<void(error_code, response)> handler);
  void detach(party* p) noexcept;
  void cancel(party* p) noexcept;

  void start_receive(party* p, receive_handler handler, bool loop_executor);
  void start_send(party* p, const udp::endpoint& to, std::span<const std::byte> message,
                  send_handler handler);
  result<void> send_copy(party* p, std::span<const std::byte> message);
  result<void> reply(party* p, event&& ev, std::span<const std::byte> answer);
  void return_event(event& ev) noexcept;

  udp::endpoint local_endpoint() const;
  std::vector<int> native_handles() const;
  const framing& frame() const noexcept { return options_.frame; }
  dispatcher_stats stats() const;
  /// The failsafe shutdown (see dispatcher); idempotent. `from_loop`: called
  /// from one of our completions, where handlers may run at once.
  void fail(error_code reason, bool from_loop);
  /// dispatcher::stop_receiving().
  void stop_receiving();

 private:
  using completions = std::vector<completion>;

  // All *_locked members run with mutex_ held.
  bool deliverable_locked(const party& p) const noexcept;
  void collect_locked(party& p, completions& out);
  void make_ready_locked(party& p, completions& out);
  /// Marks the return reply() deferred to this thread (tl_returned) done;
  /// returns the party, whose reference the caller drops once unlocked.
  party* apply_deferred_return_locked(completions& out);
  void restart_locked(sockets_to_arm& to_arm, completions& out);
  std::uint16_t next_random_locked();
  result<std::uint16_t> allocate_id_locked(const peer_key& peer);
  void classify_locked(socket_state& s, int count, completions& out);
  void classify_one_locked(queued_message& m, std::span<const std::byte> data, completions& out);
  void fail_locked(error_code reason, completions& out);

  // Exclusive ports (exclusive.cpp).
  port_mode mode_of(const response_options& o) const noexcept {
    return o.ports.value_or(options_.ports);
  }
  /// Sockets set aside under mutex_ to be closed once unlocked: a few at a
  /// time, on the stack (setting aside never allocates).
  using socket_list = boost::container::static_vector<std::shared_ptr<exclusive_socket>, 8>;
  /// Takes one of the exclusive_sockets (or says why not): under mutex_. At
  /// the limit, a kept socket gives its place up (to `closing`).
  error_code reserve_exclusive_locked(socket_list& closing);
  /// A kept socket for `peer`, no longer kept (it brings its place), or null.
  /// Expired ones met on the way go to `closing`, their places given back.
  std::shared_ptr<exclusive_socket> take_kept_locked(const peer_key& peer, socket_list& closing);
  /// Kept sockets past their lifetime (all of them with `all`) go to
  /// `closing`, as many as fit leaving `room` places free.
  void sweep_kept_locked(socket_list& closing, bool all = false, std::size_t room = 0);
  /// Closes every kept socket (shutdown, close). Not under mutex_.
  void close_kept() noexcept;
  /// Closes what the above set aside, then serves the port waiters. Not under mutex_.
  void close_set_aside(socket_list& closing) noexcept;
  /// Keeps a detached response's socket for the next response to its peer
  /// when its transaction ended well; false: the caller closes it.
  bool keep_exclusive_locked(party& p, const std::shared_ptr<exclusive_socket>& xs) noexcept;
  /// The socket carries a transaction again / no longer: the set is waited on
  /// while any does (exclusive_io.cpp).
  void activate_exclusive(exclusive_socket& xs) noexcept;
  void park_exclusive(exclusive_socket& xs) noexcept;
  /// Gives a reserved socket back and serves the waiters. Not under mutex_.
  void unreserve_exclusive() noexcept;
  /// Opens a socket on a fresh random port, connected to `peer`.
  result<std::shared_ptr<exclusive_socket>> open_exclusive(const udp::endpoint& peer);
  /// Attaches a response on a socket reserved and opened for it.
  result<response> attach_exclusive(dispatcher& owner, const udp::endpoint& peer,
                                    const response_options& options,
                                    std::shared_ptr<exclusive_socket> xs);
  result<response> add_exclusive(dispatcher& owner, const udp::endpoint& peer,
                                 const response_options& options);
  /// Attaches a response on `kept`, or on a fresh socket when it is null or
  /// spoiled; the caller holds the place (kept sockets bring theirs).
  result<response> open_and_attach(dispatcher& owner, const udp::endpoint& peer,
                                   const response_options& options,
                                   std::shared_ptr<exclusive_socket> kept);
  /// Closes a detached response's socket; its port goes to the recent ring.
  void close_exclusive(exclusive_socket& xs) noexcept;
  void serve_port_waiters() noexcept;
  /// Adds an opened socket to the epoll set (exclusive_io.cpp).
  error_code watch_exclusive(const std::shared_ptr<exclusive_socket>& xs);
  /// Takes a closed socket out of the set; the last one stops the wait.
  void unwatch_exclusive(exclusive_socket& xs) noexcept;
  void arm_exclusive_set_locked();
  void on_exclusive_set_ready(error_code ec, std::uint64_t wait);
  /// A readiness notice of `xs`: reads it, unless a read owns its reads
  /// already (exclusive_socket::reading), which then reads once more.
  void notify_exclusive(const std::shared_ptr<exclusive_socket>& xs);
  /// notify_exclusive in a turn of its own (posted).
  void post_notify_exclusive(const std::shared_ptr<exclusive_socket>& xs);
  /// Reads `xs`, for the owner of its reads, which it hands on or gives up.
  void read_exclusive(const std::shared_ptr<exclusive_socket>& xs, pooled_buffer buffer);
  /// Reads `xs` again in a turn of its own (posted), which owns its reads from
  /// then on: edge-triggered, it reports nothing new for the datagrams
  /// already waiting in it.
  void post_read_exclusive(const std::shared_ptr<exclusive_socket>& xs);
  /// The datagrams one read took from an exclusive socket (`buffers[i]`, as
  /// `headers[i]` and `from[i]` describe it): checked and queued for the
  /// response under one lock, or dropped (their buffers go back); then the
  /// response's handler runs, which may throw.
  void deliver_exclusive(exclusive_socket& xs, std::span<pooled_buffer> buffers,
                         const mmsghdr* headers, const sockaddr_storage* from);
  /// Buffers an exclusive read took from the pool came back unqueued: a shared
  /// socket that found the pool dry meanwhile has stopped, and waits for them.
  void exclusive_buffers_back();
  void deliver_exclusive_locked(exclusive_socket& xs, queued_message& m, bool truncated,
                                const sockaddr_storage& from, completions& out);
  void fail_transaction(exclusive_socket& xs, error_code ec);
  result<void> send_exclusive(party* p, std::span<const std::byte> message);
  void detach_exclusive_locked(party& p, std::shared_ptr<exclusive_socket>& closing) noexcept;

  void run_completions(completions& batch);
  /// Posts batch[first, end) and empties the batch.
  void post_completions(completions& batch, std::size_t first = 0);
  void arm(socket_state& s);
  void on_readable(socket_state& s, error_code ec);
  void restart_if_needed(bool from_loop);
  void restart(bool from_loop, socket_state* stopped = nullptr);
  socket_state& send_socket() noexcept;
  /// False when refused (socket closed, or shutting down): the completion is
  /// posted with the reason and an owned buffer goes back.
  bool enqueue(socket_state& s, outgoing&& out);
  /// `batch_end`: called by the thread that runs s's receive batch, at its end:
  /// the batch's replies go too.
  void flush(socket_state& s, bool batch_end = false);
  std::size_t send_locked(socket_state& s, outgoing* items, std::size_t count, send_results& r);
  void link_timeout_locked(party& p, std::chrono::steady_clock::duration timeout);
  void unlink_timeout_locked(party& p) noexcept;
  void arm_timer_locked();
  void on_timer();
  void invoke(completion& c, bool on_loop);
  void buffers_returned() noexcept;

  boost::asio::io_context& ctx_;
  dispatcher_options options_;
  std::unique_ptr<buffer_pool> pool_;  // never null
  std::vector<std::unique_ptr<socket_state>> sockets_;
  udp::endpoint local_;

  mutable std::mutex mutex_;
  bool closed_ = false;
  bool shutting_down_ = false;
  error_code reason_;
  std::unordered_map<id_key, party*, id_key_hash> responses_;
  std::unordered_map<peer_key, std::uint32_t, peer_key_hash> per_peer_;
  std::vector<party*> listeners_;
  std::deque<party*> idle_listeners_;
  fifo<queued_message> queries_;
  std::uint32_t lent_buffers_ = 0;
  std::uint64_t next_serial_ = 1;
  std::size_t error_event_turn_ = 0;
  std::array<std::uint16_t, 1024> random_{};
  std::size_t random_left_ = 0;
  // Every response timeout runs on this one timer, armed for the earliest deadline.
  boost::asio::steady_timer timer_;
  std::chrono::steady_clock::time_point armed_for_ = std::chrono::steady_clock::time_point::max();
  std::vector<std::unique_ptr<timeout_list>> timeout_lists_;
  // Exclusive ports: the attached exclusive responses, the sockets reserved
  // (opened or opening), the waiters; under mutex_. The draw: under port_mutex_.
  std::vector<party*> exclusive_;
  std::uint32_t exclusive_reserved_ = 0;  // sockets open or opening, kept ones included
  // Sockets kept for the next response to their peer (port_uses), and how many.
  std::unordered_map<peer_key, std::vector<std::shared_ptr<exclusive_socket>>, peer_key_hash> kept_;
  std::size_t kept_count_ = 0;
  std::chrono::steady_clock::time_point next_sweep_{};
  std::deque<std::unique_ptr<port_waiter>> port_waiters_;
  bool serving_waiters_ = false;  // a thread is in serve_port_waiters
  std::mutex port_mutex_;         // a leaf: nothing else is locked while it is held
  std::optional<port_draw> ports_;
  // The exclusive sockets' own epoll set, itself waited on by the loop: one
  // epoll_ctl per socket (its descriptor leaves the set when it closes), where
  // an asio socket would cost an ioctl and three epoll_ctl. Under slots_mutex_
  // (a leaf as well).
  std::mutex slots_mutex_;
  std::unique_ptr<boost::asio::posix::stream_descriptor> exclusive_set_;
  bool exclusive_set_armed_ = false;
  bool exclusive_set_busy_ = false;        // a thread is reading the set's ready sockets
  std::uint64_t exclusive_set_waits_ = 0;  // waits armed so far: the last one is current
  std::vector<exclusive_slot> slots_;
  std::vector<std::uint32_t> free_slots_;
  std::size_t watched_ = 0;                // registered sockets
  std::size_t active_ = 0;                 // of those, carrying a transaction: the set is waited on
  std::atomic<unsigned> idle_sockets_{0};  // sockets with no receive armed (restart hint)
  std::atomic<bool> stopping_{false};      // shutting_down_, readable without the lock
  // stop_receiving(): checked before every arm and every read of a shared socket
  // (the read under its io_mutex, so taking each io_mutex once is a barrier).
  std::atomic<bool> receiving_stopped_{false};
  // Buffers taken by receive batches and not yet classified (counted before
  // they are taken): the pool is not "dry with nothing lent" while any are out.
  std::atomic<std::size_t> in_batch_{0};
  // A shared socket may have stopped on a dry pool: set (under mutex_) before
  // restart_locked looks at the pool again, cleared once it stopped no socket
  // for that. Read without the lock by exclusive reads that gave buffers back
  // (exclusive_buffers_back), so that they restart only when it may help.
  std::atomic<bool> stopped_on_dry_pool_{false};

  std::atomic<std::uint64_t> received_{0}, sent_{0}, dropped_short_{0}, dropped_no_listener_{0},
      dropped_unmatched_{0}, dropped_queue_full_{0}, no_buffer_events_{0}, timeouts_{0},
      send_errors_{0}, dropped_no_memory_{0}, exclusive_received_{0},
      exclusive_dropped_unmatched_{0}, exclusive_port_redraws_{0}, exclusive_socket_errors_{0},
      exclusive_no_port_{0}, exclusive_reused_{0};

  handler_registration registration_;  // last: see handler_registration
};

// Shared by the dispatcher's source files (dispatcher, parties, receive, send).

// The engine whose completions this thread runs now, and their batch.
inline thread_local engine* tl_delivering = nullptr;
inline thread_local std::vector<completion>* tl_batch = nullptr;
// The socket whose receive batch this thread runs.
inline thread_local socket_state* tl_batch_socket = nullptr;
// A party whose event reply() gave back inside the batch this thread runs, not
// yet marked returned: the next lock this thread takes for that batch (the
// handler's next async_receive, as a rule) does it, so that answering a query
// takes one lock, not two. Holds the event's reference on the party.
inline thread_local party* tl_returned = nullptr;

inline error_code errno_code(int e) { return {e, boost::system::system_category()}; }

// Errors about one destination fail that send only; anything else is the socket's.
inline bool per_destination_error(int e) {
  switch (e) {
    case ENETUNREACH:
    case EHOSTUNREACH:
    case EAFNOSUPPORT:
    case EINVAL:
    case EACCES:
    case EPERM:
    case EMSGSIZE:
    case EDESTADDRREQ:
    case EADDRNOTAVAIL:
      return true;
    default:
      return false;
  }
}

}  // namespace uipc::dispatch::detail
