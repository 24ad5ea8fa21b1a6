// runner_protocol's serving side (protocol_server.hpp).
#include "protocol_server.hpp"

#include <cstring>

#include "runner_protocol.hpp"

namespace uipc::plugin::detail {

namespace proto = runner_protocol;

namespace {

// A context of the host's own for one request, ended with it.
class request_context {
 public:
  explicit request_context(host_impl& host) : host_(host) {
    if (host.stopping.load(std::memory_order_relaxed)) return;
    if (auto made = host.make_context(nullptr)) ctx_ = *made;
  }
  ~request_context() {
    if (ctx_) host_.end_context(ctx_);
  }
  request_context(const request_context&) = delete;
  request_context& operator=(const request_context&) = delete;
  uipc_plugin_context* get() const noexcept { return ctx_; }

 private:
  host_impl& host_;
  uipc_plugin_context* ctx_ = nullptr;
};

void answer_call(caps::service& svc, const caps::event& e, host_impl& host,
                 const protocol_rules& rules, const proto::request& request) {
  std::int32_t status = UIPC_PLUGIN_OK;
  std::uint64_t value = 0;
  std::span<const std::byte> answer;
  request_context ctx(host);  // outlives the reply: the answer is in its pool
  if (!ctx.get()) {
    status = host.stopping.load() ? UIPC_PLUGIN_E_STOPPED : UIPC_PLUGIN_E_TOO_MANY;
  } else {
    if (rules.call_timeout.count() > 0)
      ctx.get()->deadline = uipc_plugin_context::clock::now() + rules.call_timeout;
    auto r = call_bytes(ctx.get(), request.name, request.payload, &value, rules.callable);
    if (r)
      answer = *r;
    else
      status = r.error().category() == plugin_category() ? r.error().value()
                                                         : UIPC_PLUGIN_E_PLUGIN_FAILED;
  }
  auto sent =
      svc.reply_in_place(e, proto::reply_header + answer.size(), [&](std::span<std::byte> b) {
        proto::put_header(b, status, value);
        if (!answer.empty())
          std::memcpy(b.data() + proto::reply_header, answer.data(), answer.size());
      });
  if (sent == caps::errc::message_too_large) {
    (void)svc.reply_in_place(e, proto::reply_header, [&](std::span<std::byte> b) {
      proto::put_header(b, UIPC_PLUGIN_E_NO_MEMORY, 0);
    });
  }
}

}  // namespace

void serve_protocol(caps::service& svc, host_impl& host, const protocol_rules& rules) {
  for (;;) {
    auto e = svc.receive();
    if (!e) return;  // stopped
    if (e->kind != caps::event_kind::request) continue;
    if (rules.admit && !rules.admit(e->sender())) {
      svc.disconnect(e->client);  // not the process this point is for
      continue;
    }
    const std::string request = e->copy();  // the channel is the client's to write: copy first
    auto parsed = proto::parse(std::as_bytes(std::span(request.data(), request.size())));
    if (!parsed) {
      (void)svc.reject(*e, caps::errc::protocol_violation);
      continue;
    }
    switch (parsed->kind) {
      case proto::list:
        (void)svc.reply(*e, rules.describe());
        break;
      case proto::watch:
        rules.changes->watch(svc, e->client, e->id, proto::get_version(parsed->payload));
        break;
      case proto::call:
        answer_call(svc, *e, host, rules, *parsed);
        break;
    }
  }
}

}  // namespace uipc::plugin::detail
