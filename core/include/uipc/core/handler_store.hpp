// Handlers a library keeps outside Asio's queues, destroyed with the io_context.
//
// When an io_context is destroyed with handlers never run, Asio destroys the
// ones in its own queues (posted work, socket and timer waits). A component
// that stores handlers itself (a receive waiting in a member, a table of calls)
// must do the same, or a handler that owns what stores it (a coroutine whose
// frame holds the response it waits on) is a cycle that outlives the context,
// with everything it holds. Such a component derives from handler_store and
// keeps a handler_registration with its context for its whole life.
#pragma once

#include <boost/asio/execution_context.hpp>
#include <memory>

namespace uipc {

namespace detail {
class handler_registry;
}

/// A component that stores completion handlers outside Asio's queues.
class handler_store {
 public:
  /// The context is being destroyed, and no thread runs it: destroy every
  /// handler stored and never run, without running it. Move them out under the
  /// store's lock and destroy them after it (their destruction may come back
  /// into the store, or destroy it: touch nothing of the store after that).
  virtual void drop_handlers() noexcept = 0;

 protected:
  handler_store() = default;
  ~handler_store() = default;
  handler_store(const handler_store&) = default;
  handler_store& operator=(const handler_store&) = default;
};

/// A store's registration with its context: the context's shutdown calls the
/// store's drop_handlers() once, unless the registration ended before. Make it
/// the store's last member, so that it ends before anything drop_handlers()
/// touches. It may end after its context is gone (a store released late by
/// another thread): it then does nothing.
class handler_registration {
 public:
  handler_registration() noexcept = default;
  /// May throw std::bad_alloc (the registry's first use, the entry), and
  /// boost::system::system_error when the context cannot make its reactor
  /// (no descriptor left).
  handler_registration(boost::asio::execution_context& ctx, handler_store& store);
  ~handler_registration() { reset(); }
  handler_registration(const handler_registration&) = delete;
  handler_registration& operator=(const handler_registration&) = delete;

  /// What keeps the store alive (a shared_ptr's weak twin), once there is one:
  /// the shutdown then holds it while the store drops its handlers, so that
  /// no other thread's last release destroys the store meanwhile, and skips a
  /// store whose owner is already going (its own destructor ends its work).
  void hold(std::weak_ptr<const void> owner) noexcept;

  /// Ends the registration now (idempotent).
  void reset() noexcept;

 private:
  detail::handler_registry* registry_ = nullptr;
  handler_store* store_ = nullptr;
};

}  // namespace uipc
