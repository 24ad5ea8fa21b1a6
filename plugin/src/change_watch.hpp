// Watches of a registry's services, answered when they change: the long poll
// behind runner_protocol's `watch` (a runner tells its host, a host tells its
// runners). Answers go out on a caps service; no plug-in code runs here.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <span>
#include <vector>

#include "uipc/caps/service.hpp"

namespace uipc::plugin::detail {

class change_watch {
 public:
  std::uint64_t version() const noexcept { return version_.load(std::memory_order_acquire); }

  /// Where watches are answered; null before the service is up and once it
  /// is going (a plug-in's Shutdown may still unregister services then).
  void serve_on(caps::service* svc) {
    std::lock_guard lock(mutex_);
    svc_ = svc;
    if (svc == nullptr) pending_.clear();
  }

  /// A service came or went: every pending watch is answered.
  void changed() {
    version_.fetch_add(1, std::memory_order_acq_rel);
    // Answered under the lock, so that serve_on(nullptr) waits for it before
    // the service goes (reply() is the service's code, not a plug-in's).
    std::lock_guard lock(mutex_);
    if (svc_ != nullptr)
      for (const auto& w : pending_) answer(*svc_, w.client, w.id);
    pending_.clear();
  }

  /// A watch of `known`: answered now when the version moved on since, else
  /// at the next change. (The version is read under the lock that changed()
  /// takes after moving it, so no change is missed between.)
  void watch(caps::service& svc, caps::client_id client, caps::message_id id, std::uint64_t known) {
    {
      std::lock_guard lock(mutex_);
      if (version() == known) {
        pending_.push_back({client, id});
        return;
      }
    }
    answer(svc, client, id);
  }

 private:
  struct waiting {
    caps::client_id client;
    caps::message_id id;
  };
  void answer(caps::service& svc, caps::client_id client, caps::message_id id) {
    const std::uint64_t v = version();
    // A peer that went away meanwhile: nothing to answer.
    (void)svc.reply(client, id, std::as_bytes(std::span(&v, 1)));
  }

  std::atomic<std::uint64_t> version_{0};
  std::mutex mutex_;
  std::vector<waiting> pending_;
  caps::service* svc_ = nullptr;
};

}  // namespace uipc::plugin::detail
