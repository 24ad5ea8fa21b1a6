// The state of one framed connection, shared by its engine and its public face.
#pragma once

#include <array>
#include <atomic>
#include <boost/asio/any_completion_executor.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/prefer.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/system_executor.hpp>
#include <deque>
#include <list>
#include <mutex>
#include <optional>
#include <typeinfo>
#include <unordered_map>

#include "frame_io.hpp"
#include "uipc/core/framed.hpp"
#include "uipc/core/handler_store.hpp"
#include "uipc/core/process.hpp"

namespace uipc {

using connection_strand = boost::asio::strand<boost::asio::io_context::executor_type>;

/// A stored completion handler plus outstanding work on its executor, as Asio's
/// own operations keep it: a run() on that executor does not return while the
/// operation is pending. A handler with no executor of its own runs on the
/// connection's strand, whose context the connection's own socket wait already
/// keeps busy: it needs no guard, and the hot path skips the executor copies.
template <class Handler>
struct pending_handler {
  explicit pending_handler(Handler h) : handler(std::move(h)) {
    auto own = boost::asio::get_associated_executor(handler, boost::asio::system_executor());
    if (own.target_type() != typeid(boost::asio::system_executor)) {
      work.emplace(boost::asio::prefer(own, boost::asio::execution::outstanding_work.tracked));
    }
  }

  Handler handler;
  std::optional<boost::asio::any_completion_executor> work;
};

struct outgoing_frame {
  std::string bytes;  // prefix + envelope
  std::size_t offset = 0;
  std::vector<unique_fd> fds;  // sent with the frame's first byte
  std::optional<pending_handler<connection::send_handler>> done;
  bool is_reply = false;
};

struct connection::impl final : handler_store {
  impl(boost::asio::io_context& ctx, boost::asio::local::stream_protocol::socket s,
       connection_options o)
      : strand(boost::asio::make_strand(ctx)),
        socket(std::move(s)),
        options(std::move(o)),
        timer(strand),
        registration(ctx, *this) {}
  impl(const impl&) = delete;
  impl& operator=(const impl&) = delete;
  ~impl() = default;

  connection_strand strand;
  boost::asio::local::stream_protocol::socket socket;
  fork_guard fork;  // see engine::fail: a forked child's copy
  connection_options options;
  peer_credentials peer;
  boost::asio::steady_timer timer;
  std::chrono::steady_clock::time_point opened_at = std::chrono::steady_clock::now();
  std::atomic<std::uint64_t> next_correlation_id{1};

  // Published for other threads: stats() and close_reason().
  mutable std::mutex published_mutex;
  error_code published_reason;
  connection_stats published;

  // Everything below is touched on the strand only.
  bool open = true;
  error_code reason;
  connection_stats counters;

  detail::frame_reader reader;
  bool read_waiting = false;  // a wait (or receive) for readability is pending
  bool in_read = false;
  bool any_frame_received = false;

  // The frame timer: which stream offset it guards (or none / the first frame),
  // and a generation so that a stale expiry is recognised.
  static constexpr std::uint64_t timer_none = UINT64_MAX;
  static constexpr std::uint64_t timer_first_frame = UINT64_MAX - 1;
  std::uint64_t timer_key = timer_none;
  std::uint64_t timer_generation = 0;

  std::deque<frame> inbox;
  std::list<std::pair<std::uint64_t, pending_handler<frame_handler>>> receivers;
  std::atomic<std::uint64_t> next_receiver_id{1};
  std::unordered_map<std::uint64_t, pending_handler<frame_handler>> calls;

  std::deque<outgoing_frame> outbox;
  std::size_t outbox_bytes = 0;
  std::size_t outbox_reply_bytes = 0;
  bool write_waiting = false;
  // Frames queued by handlers that a read runs inline (replies to the frames
  // just parsed, calls made by a reply's handler) go out in batches: the
  // first of a parse at once, so that a peer waiting for it starts waking
  // while we go on; the rest together, in one sendmsg where descriptors allow,
  // once they fill one or every whole frame received is handed over (see
  // engine::parse), or before the connection closes. Their order is the
  // outbox's, as always.
  bool batch_started = false;       // this parse has written its first frame
  std::size_t frames_deferred = 0;  // queued since then, not yet written

  // Reading stops while the application is behind: too many received frames
  // not taken, or too many of our replies not yet written (a peer that sends
  // requests and never reads). Our own requests do not count: two peers
  // streaming at each other must not both stop reading.
  bool read_paused() const {
    return inbox.size() >= options.max_queued_frames ||
           outbox_reply_bytes > options.max_queued_send_bytes;
  }

  void publish() {
    counters.queued_frames = inbox.size();
    counters.queued_send_bytes = outbox_bytes;
    counters.calls_in_flight = calls.size();
    std::lock_guard lock(published_mutex);
    published = counters;
    published_reason = reason;
  }

  // The handlers the connection stores itself (receivers, calls, sends in the
  // outbox) go with the context, as Asio's own do: a server's receive handler
  // holds the session, which holds the connection, a cycle otherwise (as when
  // a server is stopped from another thread and the loop stops before the
  // posted closes run). No thread runs the strand now.
  void drop_handlers() noexcept override {
    auto dropped_receivers = std::move(receivers);
    auto dropped_calls = std::move(calls);
    auto dropped_outbox = std::move(outbox);
    receivers.clear();
    calls.clear();
    outbox.clear();
    outbox_bytes = outbox_reply_bytes = 0;
    publish();
  }  // the handlers go here, perhaps with the connection: nothing touches it after

  handler_registration registration;  // last: it ends before anything drop_handlers touches
};

}  // namespace uipc
