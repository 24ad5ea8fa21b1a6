// Completing a type-erased handler later, on its own executor: posted to the
// loop first (never inside the call that started the operation), then
// dispatched to the executor the handler is bound to (a strand, say).
#pragma once

#include <boost/asio/associated_executor.hpp>
#include <boost/asio/dispatch.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <utility>

namespace uipc::caps::detail {

template <class Handler, class... Args>
void post_completion(boost::asio::io_context& ctx, Handler handler, Args... args) {
  boost::asio::post(ctx, [handler = std::move(handler), ... args = std::move(args)]() mutable {
    auto ex = boost::asio::get_associated_executor(handler);
    boost::asio::dispatch(ex, [handler = std::move(handler), ... args = std::move(args)]() mutable {
      std::move(handler)(std::move(args)...);
    });
  });
}

}  // namespace uipc::caps::detail
