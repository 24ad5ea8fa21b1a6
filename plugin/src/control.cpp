// The control service: the text protocol of control.hpp over a caps point.
#include "uipc/plugin/control.hpp"

#include <algorithm>
#include <atomic>
#include <thread>

#include "uipc/caps/service.hpp"
#include "uipc/plugin/host.hpp"

namespace uipc::plugin {

namespace {

using clock = std::chrono::steady_clock;

// Longer requests are refused unread: a call's bytes are the only long part.
constexpr std::size_t max_request = std::size_t{1} << 20;

// A field as the protocol carries it: TABs and line breaks (and other control
// bytes) of paths and reasons become '?', so rows stay rows.
std::string field(std::string_view text) {
  std::string out(text);
  std::replace_if(
      out.begin(), out.end(),
      [](char c) { return static_cast<unsigned char>(c) < 0x20 || c == 0x7f; }, '?');
  return out;
}

std::string error_reply(std::string_view reason) { return "error\t" + field(reason) + "\n"; }

std::string plugins_table(const host& h) {
  std::string out =
      "ok\nNAME\tSTATE\tGENERATION\tMODEL\tWHERE\tABI\tSERVICES\tCRASHES\tPATH\tLAST ERROR\n";
  for (const auto& p : h.plugins()) {
    out += p.name + '\t' + field(p.state) + '\t' + std::to_string(p.generation) + '\t' +
           (p.preemptive ? "preemptive" : "cooperative") + '\t' +
           (p.isolated ? "isolated" : "in-process") + '\t' + std::to_string(p.abi_major) + '.' +
           std::to_string(p.abi_minor) + '\t' + std::to_string(p.services.size()) + '\t' +
           std::to_string(p.crashes) + '\t' + (p.path.empty() ? "-" : field(p.path)) + '\t' +
           (p.last_error.empty() ? "-" : field(p.last_error)) + '\n';
  }
  return out;
}

std::string services_table(const host& h) {
  struct row {
    std::string service, plugin;
    const char* kind;
  };
  std::vector<row> rows;
  for (const auto& p : h.plugins()) {
    for (const auto& s : p.services) {
      auto flags = h.service_flags(s);
      if (!flags) continue;  // unregistered since plugins() was taken
      rows.push_back({s, p.name, (*flags & UIPC_PLUGIN_SERVICE_BYTES) ? "bytes" : "pointer"});
    }
  }
  std::sort(rows.begin(), rows.end(),
            [](const row& a, const row& b) { return a.service < b.service; });
  std::string out = "ok\nSERVICE\tPLUGIN\tKIND\n";
  for (const auto& r : rows) out += r.service + '\t' + r.plugin + '\t' + r.kind + '\n';
  return out;
}

std::string stats_table(const host& h) {
  const host_stats s = h.stats();
  std::size_t services = 0;
  const auto plugins = h.plugins();
  for (const auto& p : plugins) services += p.services.size();
  std::string out = "ok\nCOUNTER\tVALUE\n";
  const std::pair<const char*, std::uint64_t> counters[] = {
      {"plugins", plugins.size()},
      {"services", services},
      {"calls", s.calls},
      {"failed_calls", s.failed_calls},
      {"contexts_alive", s.contexts_alive},
      {"reloads", s.reloads},
      {"retired_pending", s.retired_pending},
      {"pool_bytes_cached", s.pool_bytes_cached},
  };
  for (const auto& [name, value] : counters)
    out += std::string(name) + '\t' + std::to_string(value) + '\n';
  return out;
}

std::string reload(host& h, std::string_view name) {
  if (auto ec = h.reload(name))
    return error_reply("reload " + std::string(name) + ": " + ec.message());
  return "ok\n";
}

std::string call(host& h, std::string_view rest, std::chrono::milliseconds timeout) {
  const auto tab = rest.find('\t');
  if (tab == std::string_view::npos)
    return error_reply("call needs a service name and bytes, TAB-separated");
  const std::string_view service = rest.substr(0, tab);
  const std::string_view bytes = rest.substr(tab + 1);
  auto ctx = h.new_context();
  if (!ctx) return error_reply("call " + std::string(service) + ": " + ctx.error().message());
  ctx->set_deadline(clock::now() + timeout);
  auto r = ctx->call_bytes(service, std::as_bytes(std::span(bytes.data(), bytes.size())));
  if (!r) return error_reply("call " + std::string(service) + ": " + r.error().message());
  std::string out = "ok\n";
  out.append(reinterpret_cast<const char*>(r->data()), r->size());
  return out;
}

}  // namespace

std::string control_answer(host& h, std::string_view request,
                           std::chrono::milliseconds call_timeout) {
  const auto tab = request.find('\t');
  const std::string_view verb = request.substr(0, tab);
  const std::string_view rest =
      tab == std::string_view::npos ? std::string_view() : request.substr(tab + 1);
  const bool bare = tab == std::string_view::npos;
  if (verb == "plugins" && bare) return plugins_table(h);
  if (verb == "services" && bare) return services_table(h);
  if (verb == "stats" && bare) return stats_table(h);
  if (verb == "reload" && !bare) return reload(h, rest);
  if (verb == "call" && !bare) return call(h, rest, call_timeout);
  return error_reply(
      "unknown request (plugins, services, stats, reload\\tNAME, call\\tSERVICE\\tBYTES)");
}

struct control::impl {
  host& h;
  control_options options;
  std::unique_ptr<caps::service> service;
  std::thread worker;
  std::atomic<std::uint64_t> requests{0};

  impl(host& host, control_options o) : h(host), options(std::move(o)) {}

  void serve() {
    std::string request;
    for (;;) {
      auto e = service->receive();
      if (!e) return;  // stopped
      if (e->kind != caps::event_kind::request) continue;
      std::string reply;
      if (e->size() > max_request) {
        reply = error_reply("request too large");
      } else {
        request = e->copy();  // the client may write its channel at any moment: copy, then read
        reply = control_answer(h, request, options.call_timeout);
      }
      requests.fetch_add(1, std::memory_order_relaxed);
      if (service->reply(*e, reply) == caps::errc::message_too_large)
        (void)service->reply(*e, error_reply("reply too large for the channel"));
    }
  }
};

result<std::unique_ptr<control>> control::start(boost::asio::io_context& io, host& h,
                                                control_options options) {
  auto p = std::make_unique<impl>(h, std::move(options));
  caps::service_options so;
  so.directory = p->options.directory;
  so.who = caps::access::user;
  so.max_spin = std::chrono::nanoseconds(0);  // administrative traffic: sleep while idle
  so.max_clients = 256;
  auto svc = caps::service::register_point(io, p->options.point, so);
  if (!svc) return svc.error();
  p->service = std::move(*svc);
  p->worker = std::thread([raw = p.get()] { raw->serve(); });
  return std::unique_ptr<control>(new control(std::move(p)));
}

control::control(std::unique_ptr<impl> p) : impl_(std::move(p)) {}

control::~control() { stop(); }

void control::stop() {
  if (!impl_->service) return;
  impl_->service->stop();
  if (impl_->worker.joinable()) impl_->worker.join();
}

std::uint64_t control::requests() const noexcept {
  return impl_->requests.load(std::memory_order_relaxed);
}

}  // namespace uipc::plugin
