// request_router: one place where a frame becomes a handler call and its outcome a reply.
#include <algorithm>

#include "uipc/core/typed.hpp"

namespace uipc {

void request_router::add(std::uint32_t type, notices n, erased handler) {
  auto at = std::lower_bound(entries_.begin(), entries_.end(), type,
                             [](const entry& e, std::uint32_t t) { return e.type < t; });
  if (at != entries_.end() && at->type == type) {
    *at = entry{type, n, std::move(handler)};
  } else {
    entries_.insert(at, entry{type, n, std::move(handler)});
  }
}

const request_router::entry* request_router::find(std::uint32_t type) const noexcept {
  auto at = std::lower_bound(entries_.begin(), entries_.end(), type,
                             [](const entry& e, std::uint32_t t) { return e.type < t; });
  return at != entries_.end() && at->type == type ? &*at : nullptr;
}

std::optional<frame> request_router::serve(server_session& session, const frame& f,
                                           bool& failed) const {
  const entry* e = find(f.type);
  if (f.kind != frame_kind::request) {
    // Notices get no reply whatever happens; replies to nothing we asked mean nothing.
    if (e == nullptr || e->accepts == notices::refused || f.kind != frame_kind::notice) {
      failed = true;
      return std::nullopt;
    }
    request_context ctx{session, f, {}};
    failed = !e->handler(ctx);
    return std::nullopt;
  }
  if (e == nullptr) {
    failed = true;
    return make_error_reply(f, errors_.unknown_request);
  }
  request_context ctx{session, f, {}};
  result<std::string> payload = e->handler(ctx);
  if (!payload) {
    failed = true;
    const error_code ec =
        payload.error() == errc::bad_request ? errors_.bad_request : payload.error();
    return make_error_reply(f, ec);
  }
  frame reply = make_reply(f, f.type, std::move(*payload));
  reply.fds = std::move(ctx.reply_fds);
  return reply;
}

}  // namespace uipc
