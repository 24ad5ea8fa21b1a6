// The client's side of its channel: the ring and arena it writes, the ring it
// reads, and its calls in flight. One mutex guards all of it; nobody sleeps
// or runs user code while holding it.
#pragma once

#include <atomic>
#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/unordered/unordered_flat_map.hpp>
#include <deque>
#include <functional>
#include <mutex>
#include <vector>

#include "channel.hpp"
#include "uipc/caps/client.hpp"
#include "uipc/core/blocking_connection.hpp"
#include "uipc/core/handler_store.hpp"
#include "uipc/core/process.hpp"
#include "uipc/core/range_allocator.hpp"
#include "uipc/core/shm.hpp"

namespace uipc::caps::detail {

struct client_core final : std::enable_shared_from_this<client_core>, handler_store {
  using clock = std::chrono::steady_clock;

  client_core(boost::asio::io_context& ctx, client_options options, blocking_connection ctrl,
              shm_segment segment, channel_layout layout, unique_fd bell);
  client_core(const client_core&) = delete;
  client_core& operator=(const client_core&) = delete;
  ~client_core() = default;

  /// The context is going with async calls never completed: their handlers,
  /// and the completions collected and not yet run, go with it (see
  /// handler_store.hpp).
  void drop_handlers() noexcept override;

  // ---- calls (the public operations) ----
  result<message_id> send(std::size_t size, const std::function<void(std::span<std::byte>)>& fill,
                          clock::time_point deadline, client::call_handler* async_handler);
  result<reply> wait(message_id id, clock::time_point deadline);
  result<bool> abort(message_id id, error_code outcome);
  void dispose(message_id id) noexcept;
  error_code usable() const;

  struct call {
    std::uint64_t block = 0;   ///< request block in our arena, until the server is done
    bool server_done = false;  ///< its reply, abort or refusal arrived: the slot is free
    bool abandoned = false;    ///< aborted by us: a late reply is disposed unseen
    bool delivered = false;    ///< its outcome went to the caller
    error_code error{};        ///< the outcome, if not a reply
    bool has_reply = false;
    std::uint64_t reply_offset = 0, reply_length = 0;
    client::call_handler handler;  ///< for async calls
  };

  // ---- with the mutex held ----
  void drain(std::unique_lock<std::mutex>& lock);
  bool push(const entry& e);  // false: the server broke the ring
  void flush_backlog();
  void ring_server();
  void fail_all(error_code ec);
  void finish_async(std::uint64_t id, call& c);
  reply make_reply(std::uint64_t id, const call& c);
  bool maybe_ready() const noexcept;
  void check_server();

  /// Sleeps until the server publishes something, the server goes, or `deadline`.
  void wait_for_news(clock::time_point deadline);
  /// Runs the async completions collected by drain() (mutex not held).
  void run_completions();
  void listen();

  boost::asio::io_context& ctx;
  client_options options;
  fork_guard fork;
  blocking_connection ctrl;
  peer_credentials server;
  unique_fd server_pidfd;
  shm_segment segment;
  channel_layout layout;
  channel_shared* shared;
  std::byte* request_arena;
  const std::byte* reply_arena;
  unique_fd bell;  ///< our end of the doorbells (bell.hpp)
  std::uint64_t generation = 0;
  gid_t gid = 0;
  std::uint32_t max_in_flight = 1;

  mutable std::mutex mutex;
  ring_writer to_server;
  ring_reader from_server;
  range_allocator request_space;  // the request arena: private books of a shared region
  std::deque<entry> backlog;      ///< disposals and aborts waiting for ring space
  std::uint64_t next_id = 1;
  boost::unordered_flat_map<message_id, call> calls;  // open addressing: no malloc per call
  std::size_t in_flight = 0;                          ///< calls the server has not finished
  error_code closed;
  std::vector<std::function<void()>> completions;
  std::atomic<bool> completions_waiting{false};  ///< !completions.empty(), read without the mutex

  // Async listening: the client doorbell and the server's pidfd on the loop.
  boost::asio::posix::stream_descriptor bell_desc;
  boost::asio::posix::stream_descriptor pidfd_desc;
  std::size_t async_waiting = 0;
  bool bell_armed = false;
  bool pidfd_armed = false;

  handler_registration registration;  // last: see handler_registration
};

}  // namespace uipc::caps::detail
