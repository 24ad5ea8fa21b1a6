// uipcd's caps points: the control point (`uipcctl status`, `stats`,
// `clients`, `reload`, and the plug-in host's verbs), the plug-in host's own
// control point, and the echo point.
//
// The control protocol is the plug-in host's (uipc/plugin/control.hpp): one
// text request per call, "ok\n" and TAB-separated rows, or "error\t<why>\n".
// uipcd adds:
//   "status"          KEY, VALUE rows: what serves where, reload errors
//   "stats"           MODULE, COUNTER, LABEL, VALUE rows
//   "clients"         the clients of uipcd's own caps points and of its
//                     handle daemon
//   "handles"         the handle daemon's live objects
//   "points"          every live caps point of the rendezvous directory
//   "reload"          the configuration and the plug-ins, as SIGHUP does
// Requests are untrusted: each is copied before it is read, anything else
// gets an error, and those that may block (reload, call) run on the admin
// thread so the loop never waits for a plug-in's Init; at most
// max_admin_queued of them are queued or running there, each with its copy
// of the request, and one more is answered "busy" at once.
#include <boost/asio/post.hpp>

#include "server_impl.hpp"
#include "uipc/caps/point.hpp"

namespace uipcd {

namespace {

constexpr std::size_t max_request = std::size_t{1} << 20;
constexpr std::uint32_t max_admin_queued = 16;

std::string error_reply(std::string_view why) {
  std::string out = "error\t";
  for (char c : why) out += (c == '\n' || c == '\t') ? ' ' : c;
  return out + "\n";
}

const char* access_text(uipc::caps::access a) {
  switch (a) {
    case uipc::caps::access::user:
      return "user";
    case uipc::caps::access::group:
      return "group";
    case uipc::caps::access::world:
      return "world";
  }
  return "?";
}

std::string points_table(const std::string& directory) {
  auto points = uipc::caps::list_points(directory);
  if (!points) return error_reply("points: " + points.error().message());
  std::string out = "ok\nPOINT\tUID\tGID\tACCESS\tMODE\tPID\tCLIENTS\n";
  for (const auto& p : *points)
    out += p.name + '\t' + std::to_string(p.uid) + '\t' + std::to_string(p.gid) + '\t' +
           access_text(p.who) + '\t' + (p.exclusive ? "exclusive" : "shared") + '\t' +
           std::to_string(p.pid) + '\t' + std::to_string(p.clients) + '\n';
  return out;
}

}  // namespace

void own_point::note_client(const uipc::caps::event& e) {
  std::lock_guard lock(clients_mutex);
  if (e.kind == uipc::caps::event_kind::connected)
    clients[e.client] = e.sender();
  else
    clients.erase(e.client);
}

uipc::error_code server::impl::start_points() {
  uipc::caps::service_options o;
  o.directory = cfg.caps_directory;
  o.who = uipc::caps::access::user;
  o.max_spin = std::chrono::nanoseconds(0);  // served on the loop: never spin there
  auto c = uipc::caps::service::register_point(loop.context(), cfg.control_point, o);
  if (!c) {
    std::fprintf(stderr, "uipcd: cannot register the control point %s: %s\n",
                 cfg.control_point.c_str(), c.error().message().c_str());
    return c.error();
  }
  control.service = std::move(*c);
  std::printf("control: %s\n", cfg.control_point.c_str());

  if (!cfg.plugins_point.empty()) {
    uipc::plugin::control_options po;
    po.point = cfg.plugins_point;
    po.directory = cfg.caps_directory;
    auto p = uipc::plugin::control::start(loop.context(), *host, po);
    if (!p) {
      std::fprintf(stderr, "uipcd: cannot register the plug-ins point %s: %s\n",
                   cfg.plugins_point.c_str(), p.error().message().c_str());
      return p.error();
    }
    plugin_control = std::move(*p);
    std::printf("plugins: %s\n", cfg.plugins_point.c_str());
  }

  if (!cfg.echo_point.empty()) {
    auto e = uipc::caps::service::register_point(loop.context(), cfg.echo_point, o);
    if (!e) {
      std::fprintf(stderr, "uipcd: cannot register the echo point %s: %s\n", cfg.echo_point.c_str(),
                   e.error().message().c_str());
      return e.error();
    }
    echo.service = std::move(*e);
    std::printf("echo: %s\n", cfg.echo_point.c_str());
    serve_echo();
  }
  serve_control();
  return {};
}

void server::impl::serve_echo() {
  echo.service->async_receive([this](uipc::error_code ec, uipc::caps::event e) {
    if (ec) return;  // stopped
    if (e.kind == uipc::caps::event_kind::request) {
      const auto began = clock::now();
      // Echoed, never read: the bytes go back as they are.
      (void)echo.service->reply(e, e.view());
      echo.latency.record(clock::now() - began);
    } else if (e.kind == uipc::caps::event_kind::connected ||
               e.kind == uipc::caps::event_kind::disconnected) {
      echo.note_client(e);
    }
    serve_echo();
  });
}

std::string server::impl::handles_table() const {
  if (!handles) return error_reply("the handle daemon is not enabled");
  std::string out = "ok\nHANDLE\tTYPE\tREFS\tVALUE\tNAME\n";
  for (const auto& h : handles->objects())
    out += uipc::handles::to_string(h.handle) + '\t' + uipc::handles::to_string(h.type) + '\t' +
           std::to_string(h.refcount) + '\t' + std::to_string(h.value) + '\t' +
           (h.name.empty() ? "-" : h.name) + '\n';
  return out;
}

std::string server::impl::clients_table() {
  std::string out = "ok\nPOINT\tCLIENT\tPID\tUID\tGID\n";
  // The handle daemon's sessions, under the name of its module (the daemon
  // learns no gid: "-").
  if (handles)
    for (const auto& c : handles->clients())
      out += "handles\t" + std::to_string(c.session) + '\t' + std::to_string(c.pid) + '\t' +
             std::to_string(c.uid) + "\t-\n";
  for (own_point* p : {&control, &echo}) {
    if (!p->service) continue;
    std::lock_guard lock(p->clients_mutex);
    for (const auto& [id, who] : p->clients)
      out += p->service->name() + '\t' + std::to_string(id) + '\t' + std::to_string(who.pid) +
             '\t' + std::to_string(who.uid) + '\t' + std::to_string(who.gid) + '\n';
  }
  return out;
}

void server::impl::serve_control() {
  control.service->async_receive([this](uipc::error_code ec, uipc::caps::event e) {
    if (ec) return;  // stopped
    if (e.kind == uipc::caps::event_kind::connected ||
        e.kind == uipc::caps::event_kind::disconnected) {
      control.note_client(e);
    } else if (e.kind == uipc::caps::event_kind::request) {
      const auto began = clock::now();
      const auto client = e.client;
      const auto id = e.id;
      auto answer = [this, client, id, began](const std::string& reply) {
        if (control.service->reply(client, id, reply) == uipc::caps::errc::message_too_large)
          (void)control.service->reply(client, id,
                                       error_reply("the reply is too large for the channel"));
        control.latency.record(clock::now() - began);
      };
      if (e.size() > max_request) {
        answer(error_reply("request too large"));
      } else {
        std::string request = e.copy();  // the client may write its channel at any moment
        const auto tab = request.find('\t');
        const std::string verb = request.substr(0, tab);
        const bool bare = tab == std::string::npos;
        if (verb == "status" && bare) {
          answer("ok\n" + status_table());
        } else if (verb == "stats" && bare) {
          answer("ok\n" + stats_table(collect()));
        } else if (verb == "clients" && bare) {
          answer(clients_table());
        } else if (verb == "handles" && bare) {
          answer(handles_table());
        } else if (verb == "points" && bare) {
          answer(points_table(cfg.caps_directory));
        } else if ((verb == "reload" || verb == "call") &&
                   admin_queued.fetch_add(1) >= max_admin_queued) {
          admin_queued.fetch_sub(1);
          answer(error_reply("busy: " + std::to_string(max_admin_queued) +
                             " reloads and calls are queued or running; try again"));
        } else if (verb == "reload" && bare) {
          boost::asio::post(admin, [this, answer] {
            const std::string why = reload_all();
            admin_queued.fetch_sub(1);
            answer(why.empty() ? "ok\n" : error_reply(why));
          });
        } else if (verb == "reload" || verb == "call") {  // may wait for a plug-in: not on the loop
          boost::asio::post(admin, [this, answer, request = std::move(request)] {
            const std::string reply =
                uipc::plugin::control_answer(*host, request, std::chrono::seconds(5));
            admin_queued.fetch_sub(1);
            answer(reply);
          });
        } else if ((verb == "plugins" || verb == "services") && bare) {
          answer(uipc::plugin::control_answer(*host, request, std::chrono::seconds(5)));
        } else {
          answer(
              error_reply("unknown request (status, stats, clients, handles, points, reload, "
                          "reload\\tNAME, plugins, services, call\\tSERVICE\\tBYTES)"));
        }
      }
    }
    serve_control();
  });
}

}  // namespace uipcd
