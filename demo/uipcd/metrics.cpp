// uipcd's metrics endpoint on Boost.Beast.
#include "metrics.hpp"

#include <algorithm>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <cstdio>
#include <map>
#include <mutex>
#include <unordered_map>
#include <utility>

namespace uipcd {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;

namespace {

// A counter's family ends in "_total", once ("clients_total" stays itself).
std::string with_total(const std::string& name) {
  constexpr std::string_view suffix = "_total";
  const bool has = name.size() >= suffix.size() &&
                   name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  return has ? name : name + std::string(suffix);
}

}  // namespace

std::string prometheus_text(const std::vector<figure>& rows) {
  // The text format wants each family's samples together under one TYPE line;
  // collect() interleaves the families of several points (a row per figure
  // per point), so the rows are grouped by family, in order of first sight.
  const auto is_duration = [](const figure& r) {
    return r.name.size() > 3 && r.name.compare(r.name.size() - 3, 3, "_ns") == 0;
  };
  std::vector<std::string> families(rows.size());
  std::unordered_map<std::string, std::size_t> first_seen;
  std::vector<std::pair<std::size_t, std::size_t>> order;  // (family's first row, row)
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const figure& r = rows[i];
    families[i] = "uipc_" + r.module + "_" +
                  (is_duration(r) ? r.name.substr(0, r.name.size() - 3) + "_seconds"
                   : r.counter    ? with_total(r.name)
                                  : r.name);
    order.emplace_back(first_seen.try_emplace(families[i], i).first->second, i);
  }
  std::stable_sort(order.begin(), order.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  std::string out;
  std::string family_done;
  char number[64];
  for (const auto& [first, i] : order) {
    const figure& r = rows[i];
    const bool duration = is_duration(r);
    const std::string& family = families[i];
    if (family != family_done) {
      out += "# TYPE " + family + (duration ? " summary\n" : r.counter ? " counter\n" : " gauge\n");
      family_done = family;
    }
    std::string labels;
    std::string_view label = r.label;
    if (duration) {  // "POINT p50" or "p50": the point (if any), then the quantile
      const auto space = label.rfind(' ');
      const std::string_view q = space == std::string_view::npos ? label : label.substr(space + 1);
      if (space != std::string_view::npos)
        labels = "point=\"" + std::string(label.substr(0, space)) + "\",";
      labels += "quantile=\"0." + std::string(q.substr(1)) + "\"";
    } else if (!label.empty()) {
      labels = "point=\"" + std::string(label) + "\"";
    }
    if (duration)
      std::snprintf(number, sizeof number, "%.9g", static_cast<double>(r.value) * 1e-9);
    else
      std::snprintf(number, sizeof number, "%llu", static_cast<unsigned long long>(r.value));
    out += family + (labels.empty() ? "" : "{" + labels + "}") + " " + number + "\n";
  }
  return out;
}

namespace {

constexpr std::size_t max_connections = 64;

class connection;

}  // namespace

struct metrics_server::impl : std::enable_shared_from_this<impl> {
  impl(asio::io_context& context, std::function<std::string()> r)
      : io(context),
        acceptor(asio::make_strand(context)),
        pause(acceptor.get_executor()),
        render(std::move(r)) {}

  asio::io_context& io;
  tcp::acceptor acceptor;
  asio::steady_timer pause;  // after a failed accept (no descriptors, say)
  std::function<std::string()> render;
  std::mutex mutex;  // guards `open`, `next_id` and `stopped`
  std::map<std::uint64_t, std::shared_ptr<connection>> open;  // by age: the oldest first
  std::uint64_t next_id = 0;
  bool stopped = false;

  void accept();
  void closed(std::uint64_t id) {
    std::lock_guard lock(mutex);
    open.erase(id);
  }
};

namespace {

class connection : public std::enable_shared_from_this<connection> {
 public:
  connection(tcp::socket s, std::shared_ptr<metrics_server::impl> server, std::uint64_t id)
      : stream_(std::move(s)), server_(std::move(server)), id_(id) {}

  void start() {
    parser_.emplace();
    parser_->body_limit(0);
    parser_->header_limit(8 * 1024);
    stream_.expires_after(std::chrono::seconds(5));
    http::async_read(
        stream_, buffer_, *parser_,
        [self = shared_from_this()](beast::error_code ec, std::size_t) { self->on_read(ec); });
  }
  void close() {
    asio::post(stream_.get_executor(), [self = shared_from_this()] {
      beast::error_code ignored;
      self->stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
      self->stream_.close();
    });
  }

 private:
  void on_read(beast::error_code ec) {
    if (ec) return finish();
    const auto& request = parser_->get();
    response_.version(request.version());
    response_.keep_alive(false);
    response_.set(http::field::server, "uipcd");
    if (request.target() != "/metrics") {
      response_.result(http::status::not_found);
      response_.set(http::field::content_type, "text/plain");
      response_.body() = "not found: try /metrics\n";
    } else if (request.method() != http::verb::get && request.method() != http::verb::head) {
      response_.result(http::status::method_not_allowed);
      response_.set(http::field::allow, "GET, HEAD");
      response_.set(http::field::content_type, "text/plain");
      response_.body() = "only GET\n";
    } else {
      response_.result(http::status::ok);
      response_.set(http::field::content_type, "text/plain; version=0.0.4");
      response_.body() = server_->render();
      if (request.method() == http::verb::head) {
        response_.content_length(response_.body().size());
        response_.body().clear();
      }
    }
    if (!response_.has_content_length()) response_.prepare_payload();
    http::async_write(
        stream_, response_,
        [self = shared_from_this()](beast::error_code, std::size_t) { self->finish(); });
  }
  void finish() {
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_send, ignored);
    stream_.close();
    server_->closed(id_);
  }

  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::empty_body>> parser_;
  http::response<http::string_body> response_;
  std::shared_ptr<metrics_server::impl> server_;
  std::uint64_t id_;
};

}  // namespace

void metrics_server::impl::accept() {
  acceptor.async_accept(asio::make_strand(io),
                        [self = shared_from_this()](beast::error_code ec, tcp::socket s) {
                          if (ec == asio::error::operation_aborted) return;
                          if (ec) {
                            // No descriptor (EMFILE), no memory: the connection stays in the
                            // backlog, and accepting again at once would fail again, for ever,
                            // on a loop thread. Pause first.
                            std::lock_guard lock(self->mutex);
                            if (self->stopped) return;
                            self->pause.expires_after(std::chrono::milliseconds(100));
                            self->pause.async_wait([self](beast::error_code wait) {
                              if (!wait) self->accept();
                            });
                            return;
                          }
                          std::shared_ptr<connection> c, evicted;
                          {
                            std::lock_guard lock(self->mutex);
                            if (self->stopped) return;
                            // Full: the oldest goes, not the newest. Connections anyone on the
                            // host can open and leave silent (up to the 5 s read deadline each,
                            // again and again) must not shut every scraper out.
                            if (self->open.size() >= max_connections) {
                              evicted = std::move(self->open.begin()->second);
                              self->open.erase(self->open.begin());
                            }
                            const std::uint64_t id = self->next_id++;
                            c = std::make_shared<connection>(std::move(s), self, id);
                            self->open.emplace(id, c);
                          }
                          if (evicted) evicted->close();
                          c->start();
                          self->accept();
                        });
}

uipc::result<std::unique_ptr<metrics_server>> metrics_server::start(
    asio::io_context& io, const std::string& listen, std::function<std::string()> render) {
  const auto colon = listen.rfind(':');
  if (colon == std::string::npos) return make_error_code(std::errc::invalid_argument);
  std::string host = listen.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  if (host == "localhost") host = "127.0.0.1";
  boost::system::error_code ec;
  const auto address = asio::ip::make_address(host, ec);
  if (ec) return ec;
  if (!address.is_loopback()) return make_error_code(std::errc::invalid_argument);
  unsigned port = 0;
  try {
    port = static_cast<unsigned>(std::stoul(listen.substr(colon + 1)));
  } catch (const std::exception&) {
    return make_error_code(std::errc::invalid_argument);
  }
  if (port > 65535) return make_error_code(std::errc::invalid_argument);
  auto p = std::make_shared<impl>(io, std::move(render));
  const tcp::endpoint where(address, static_cast<unsigned short>(port));
  p->acceptor.open(where.protocol(), ec);
  if (!ec) p->acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) p->acceptor.bind(where, ec);
  if (!ec) p->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return ec;
  p->accept();
  return std::unique_ptr<metrics_server>(new metrics_server(std::move(p)));
}

metrics_server::metrics_server(std::shared_ptr<impl> p) : impl_(std::move(p)) {}

metrics_server::~metrics_server() { stop(); }

void metrics_server::stop() {
  std::map<std::uint64_t, std::shared_ptr<connection>> open;
  {
    std::lock_guard lock(impl_->mutex);
    if (impl_->stopped) return;
    impl_->stopped = true;
    open.swap(impl_->open);
  }
  asio::post(impl_->acceptor.get_executor(), [p = impl_] {
    boost::system::error_code ignored;
    p->acceptor.close(ignored);
    p->pause.cancel();
  });
  for (const auto& [id, c] : open) c->close();
}

std::string metrics_server::address() const {
  boost::system::error_code ec;
  const auto e = impl_->acceptor.local_endpoint(ec);
  if (ec) return "?";
  const auto a = e.address().to_string();
  return (e.address().is_v6() ? "[" + a + "]" : a) + ":" + std::to_string(e.port());
}

}  // namespace uipcd
