// The registry of handler stores, one per io_context (see handler_store.hpp).
#include "uipc/core/handler_store.hpp"

#include <atomic>
#include <boost/asio/io_context.hpp>
#include <cstddef>
#include <memory>
#include <mutex>
#include <unordered_map>
// After io_context.hpp: the reactor header alone does not compile.
#include <boost/asio/detail/reactor.hpp>

namespace uipc::detail {

namespace asio = boost::asio;

// The stores of one context. Shared, counted, by the context's service and by
// every registration: a registration may end after the context is gone (an
// operation whose last holder is another thread), and then finds an empty map
// instead of a destroyed service.
class handler_registry {
 public:
  void add(handler_store* s) {
    std::lock_guard lock(mutex_);
    stores_.emplace(s, entry{});
  }
  void hold(handler_store* s, std::weak_ptr<const void> owner) noexcept {
    std::lock_guard lock(mutex_);
    if (auto it = stores_.find(s); it != stores_.end()) {
      it->second.owner = std::move(owner);
      it->second.owned = true;
    }
  }
  void remove(handler_store* s) noexcept {
    std::lock_guard lock(mutex_);
    stores_.erase(s);
  }

  void retain() noexcept { refs_.fetch_add(1, std::memory_order_relaxed); }
  void release() noexcept {
    // NOLINTNEXTLINE(cppcoreguidelines-owning-memory): counted; the last holder frees it
    if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
  }

  // One store at a time, taken off the map before it drops its handlers: their
  // destruction may destroy it, or other stores (which leave the map as they
  // go), so nothing here holds a store's address across a drop. A store with
  // an owner is held through the drop (see handler_registration::hold).
  void drop_all() {
    for (;;) {
      handler_store* s = nullptr;
      entry e;
      {
        std::lock_guard lock(mutex_);
        if (stores_.empty()) return;
        auto it = stores_.begin();
        s = it->first;
        e = std::move(it->second);
        stores_.erase(it);
      }
      const std::shared_ptr<const void> held = e.owner.lock();
      if (e.owned && !held) continue;  // going already: its destructor ends its work
      s->drop_handlers();
    }  // `held` goes last, perhaps with the store
  }

 private:
  struct entry {
    std::weak_ptr<const void> owner;
    bool owned = false;
  };

  std::atomic<std::size_t> refs_{1};
  std::mutex mutex_;
  std::unordered_map<handler_store*, entry> stores_;
};

// An execution_context service: the context shuts its services down in the
// reverse order of their creation, before it destroys any. The service is
// created after the reactor (see handler_registration), so it shuts down
// before the reactor and the scheduler, which are still whole while the
// stores' handlers (and perhaps the stores, and their sockets) go.
class handler_registry_service : public asio::execution_context::service {
 public:
  using key_type = handler_registry_service;
  static inline asio::execution_context::id id;  // use_service requires it

  explicit handler_registry_service(asio::execution_context& ctx)
      // NOLINTNEXTLINE(cppcoreguidelines-owning-memory): counted (see release())
      : service(ctx), registry_(new handler_registry) {}
  ~handler_registry_service() override { registry_->release(); }
  handler_registry_service(const handler_registry_service&) = delete;
  handler_registry_service& operator=(const handler_registry_service&) = delete;

  handler_registry& registry() noexcept { return *registry_; }

 private:
  void shutdown() override { registry_->drop_all(); }

  handler_registry* registry_;  // counted: see handler_registry
};

}  // namespace uipc::detail

namespace uipc {

handler_registration::handler_registration(boost::asio::execution_context& ctx,
                                           handler_store& store) {
  // The reactor first, if nothing made it yet: see handler_registry_service.
  boost::asio::use_service<boost::asio::detail::reactor>(ctx);
  auto& registry = boost::asio::use_service<detail::handler_registry_service>(ctx).registry();
  registry.add(&store);
  registry.retain();
  registry_ = &registry;
  store_ = &store;
}

void handler_registration::hold(std::weak_ptr<const void> owner) noexcept {
  if (registry_ != nullptr) registry_->hold(store_, std::move(owner));
}

void handler_registration::reset() noexcept {
  if (registry_ != nullptr) {
    registry_->remove(store_);
    registry_->release();
  }
  registry_ = nullptr;
  store_ = nullptr;
}

}  // namespace uipc
