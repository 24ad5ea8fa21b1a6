// Services of another process, relayed into a host (remote_services.hpp).
#include "remote_services.hpp"

#include <algorithm>
#include <array>
#include <cstring>

#include "worker_set.hpp"

namespace uipc::plugin::detail {

namespace proto = runner_protocol;
using clock = std::chrono::steady_clock;

class remote_services::proxy final : public isolation_proxy {
 public:
  proxy(remote_services& remote, std::string name) : remote_(remote), name_(std::move(name)) {}
  int call(uipc_plugin_context* ctx, void* arg, std::uint64_t* out) override {
    return remote_.call(ctx, name_, arg, out);
  }
  const std::string& name() const noexcept { return name_; }

 private:
  remote_services& remote_;
  std::string name_;
};

remote_services::remote_services(host_impl& host, std::string what,
                                 std::chrono::milliseconds call_timeout,
                                 std::chrono::milliseconds list_timeout)
    : host_(host),
      what_(std::move(what)),
      call_timeout_(call_timeout),
      list_timeout_(list_timeout) {}

remote_services::~remote_services() {
  stop_watching();
  disconnect();
}

result<proto::listing> remote_services::list(caps::client& client) const {
  const std::byte request[2] = {static_cast<std::byte>(proto::list), std::byte{0}};
  auto reply = client.call(std::span(request), clock::now() + list_timeout_);
  if (!reply) return reply.error();
  auto out = proto::parse_listing(reply->copy());
  if (!out) {
    host_.log(1, what_ + ": its list of services is malformed");
    return make_error_code(errc::plugin_failed);
  }
  return std::move(*out);
}

void remote_services::connect(std::shared_ptr<caps::client> client,
                              const caps::point_address& address) {
  std::lock_guard lock(mutex_);
  client_ = std::move(client);
  address_ = address;
}

void remote_services::disconnect() {
  std::shared_ptr<caps::client> gone;  // closed outside the lock
  std::lock_guard lock(mutex_);
  gone = std::move(client_);
}

std::vector<relayed_service> remote_services::entries_for(const proto::listing& listed) {
  std::vector<relayed_service> out;
  for (const auto& [name, flags] : listed.services) {
    service_entry entry;
    if (flags & UIPC_PLUGIN_SERVICE_BYTES) {
      std::lock_guard lock(proxies_mutex_);
      proxy* p = nullptr;
      if (auto it = proxy_index_.find(name); it != proxy_index_.end()) {
        p = it->second;
      } else if (proxies_.size() < max_proxies) {
        p = proxies_.emplace_back(std::make_unique<proxy>(*this, name)).get();
        proxy_index_.emplace(p->name(), p);
      } else {
        continue;  // a side that keeps listing new names: the rest go unpublished
      }
      entry.data = static_cast<isolation_proxy*>(p);
      entry.flags = UIPC_PLUGIN_SERVICE_BYTES | isolated_service;
    } else {
      entry.flags = remote_pointer_service;
    }
    out.push_back({name, entry});
  }
  return out;
}

void remote_services::start_watching(plugin_record& record, proto::listing listed) {
  std::lock_guard lock(mutex_);
  // Not connected (the other side died: its restart watches again), stopped,
  // or watched already.
  if (!client_ || stop_ || watcher_.joinable()) return;
  watcher_ = std::thread([this, &record, address = address_, l = std::move(listed)]() mutable {
    watch(record, address, std::move(l));
  });
}

void remote_services::join_watcher() {
  std::thread w;
  {
    std::lock_guard lock(mutex_);
    w = std::move(watcher_);
  }
  if (w.joinable()) w.join();
}

void remote_services::stop_watching() {
  {
    std::lock_guard lock(mutex_);
    stop_ = true;
    if (watch_client_ && watch_id_) (void)watch_client_->abort(*watch_id_);
  }
  join_watcher();
}

// The watcher: publishes what `listed` says, then waits for the other side's
// next change and lists again, until it goes (the call fails) or we stop.
void remote_services::watch(plugin_record& record, const caps::point_address& address,
                            proto::listing listed) {
  // A connection of its own: a call waiting on the proxies' connection
  // would be woken by every reply to them.
  caps::client_options copts;
  copts.handshake_timeout = list_timeout_;
  copts.max_spin = std::chrono::nanoseconds(0);  // it waits long: sleep at once
  auto connected = caps::client::connect(io_, address, copts);
  if (!connected) return;  // the other side went already: a restart watches again
  std::shared_ptr<caps::client> client(std::move(*connected));
  constexpr auto watch_pace = std::chrono::milliseconds(10);
  auto round_started = clock::now();
  for (;;) {
    {
      std::lock_guard lock(mutex_);
      if (stop_) break;
    }
    host_.relay(record, entries_for(listed));
    std::array<std::byte, 10> request{static_cast<std::byte>(proto::watch), std::byte{0}};
    std::memcpy(request.data() + 2, &listed.version, sizeof listed.version);
    caps::message_id id;
    {
      std::lock_guard lock(mutex_);
      if (stop_) break;
      auto sent = client->send(std::span<const std::byte>(request));
      if (!sent) break;
      id = *sent;
      watch_client_ = client;
      watch_id_ = id;
    }
    auto changed = client->wait(id, clock::time_point::max());
    {
      std::lock_guard lock(mutex_);
      watch_id_.reset();
    }
    if (!changed) break;  // the other side went, or stop_watching()
    // At most one listing per pace: a side answering every watch at once
    // would have this thread relist, republish and notify without a pause.
    std::this_thread::sleep_until(round_started + watch_pace);
    round_started = clock::now();
    auto now = list(*client);
    if (!now) break;
    listed = std::move(*now);
  }
  std::lock_guard lock(mutex_);
  watch_client_.reset();
}

int remote_services::call(uipc_plugin_context* ctx, const std::string& service, void* arg,
                          std::uint64_t* out) {
  auto* bc = static_cast<uipc_plugin_bytes_call*>(arg);
  if (!bc || bc->size < sizeof(uipc_plugin_bytes_call) || (bc->in_size && !bc->in))
    return UIPC_PLUGIN_E_INVALID_ARGUMENT;
  std::shared_ptr<caps::client> client;
  {
    std::lock_guard lock(mutex_);
    client = client_;
  }
  if (!client) return UIPC_PLUGIN_E_UNAVAILABLE;
  // The other side may call back into us while we wait: keep a worker free for it.
  worker_set::wait_scope scope;
  if (!scope.ok()) return UIPC_PLUGIN_E_TOO_MANY;
  const auto deadline =
      ctx->deadline != clock::time_point::max() ? ctx->deadline : clock::now() + call_timeout_;
  const std::size_t size = 2 + service.size() + bc->in_size;
  auto reply = client->call_in_place(
      size,
      [&](std::span<std::byte> b) {
        b[0] = static_cast<std::byte>(proto::call);
        b[1] = static_cast<std::byte>(service.size());
        std::memcpy(b.data() + 2, service.data(), service.size());
        if (bc->in_size) std::memcpy(b.data() + 2 + service.size(), bc->in, bc->in_size);
      },
      deadline);
  if (!reply) {
    if (reply.error() == caps::errc::timed_out) return UIPC_PLUGIN_E_TIMED_OUT;
    if (reply.error() == caps::errc::message_too_large) return UIPC_PLUGIN_E_INVALID_ARGUMENT;
    return UIPC_PLUGIN_E_UNAVAILABLE;  // the other side died (a runner is restarted)
  }
  // Its bytes: checked and copied before anything else. (It can still write
  // them meanwhile: the copy is what counts.)
  auto answer = proto::parse_reply(reply->view());
  if (!answer) return UIPC_PLUGIN_E_PLUGIN_FAILED;
  if (answer->status != UIPC_PLUGIN_OK) return answer->status;
  const std::size_t n = answer->bytes.size();
  void* copy = nullptr;
  if (n) {
    if (int s = ctx->memory.allocate(n, &copy); s != UIPC_PLUGIN_OK) return s;
    std::memcpy(copy, answer->bytes.data(), n);
  }
  bc->out = copy;
  bc->out_size = n;
  *out = answer->result;
  return UIPC_PLUGIN_OK;
}

}  // namespace uipc::plugin::detail
