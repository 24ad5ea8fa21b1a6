// The object types (object, event, mutex, semaphore, scratch_block): operations
// that run in the shared segment, and the closes their destructors post.
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sys/file.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <boost/container/static_vector.hpp>
#include <mutex>
#include <optional>
#include <thread>

#include "owned_mutexes.hpp"
#include "session.hpp"
#include "uipc/handles/client.hpp"
#include "uipc/proto/handles.pb.h"

namespace uipc::handles {

namespace pb = uipc::proto::handles;
using detail::request_type;
using steady = std::chrono::steady_clock;

// ---- objects ----------------------------------------------------------------------

object::object(std::shared_ptr<detail::session> s, handle_id h, object_type t, bool existed)
    : session_(std::move(s)), handle_(h), type_(t), existed_(existed) {}

object::object(object&& other) noexcept
    : session_(std::move(other.session_)),
      handle_(other.handle_),
      type_(other.type_),
      existed_(other.existed_) {
  other.session_.reset();
}

object& object::operator=(object&& other) noexcept {
  if (this != &other) {
    close();
    session_ = std::move(other.session_);
    other.session_.reset();
    handle_ = other.handle_;
    type_ = other.type_;
    existed_ = other.existed_;
  }
  return *this;
}

object::~object() {
  if (session_ && session_->usable()) {
    pb::CloseRequest in;
    in.mutable_handle()->set_index(handle_.index);
    in.mutable_handle()->set_generation(handle_.generation);
    session_->post(request_type::close, in.SerializeAsString());
  }
}

error_code object::close() {
  if (!session_) return {};
  auto s = std::move(session_);
  session_.reset();
  if (!s->usable()) return s->map->lost_reason();
  pb::CloseRequest in;
  in.mutable_handle()->set_index(handle_.index);
  in.mutable_handle()->set_generation(handle_.generation);
  auto reply = s->call(request_type::close, in.SerializeAsString());
  return reply ? error_code{} : reply.error();
}

handle_id object::detach() noexcept {
  session_.reset();
  return handle_;
}

result<detail::slot*> object::checked(object_type expected) const {
  if (!session_) return make_error_code(errc::invalid_handle);
  if (!session_->usable()) return session_->map->lost_reason();
  return detail::checked_slot(session_->map->view, handle_, expected);
}

result<wait_status> object::wait(std::chrono::nanoseconds timeout) const {
  auto s = checked(type_);
  if (!s) return s.error();
  const detail::wait_target target{*s, type_, handle_.generation};
  auto r = detail::wait(session_->map->view, std::span(&target, 1), false, timeout,
                        session_->options.spin);
  if (!r) return r.error();
  return r->status;
}

error_code event::signal() const {
  auto s = checked(type_);
  if (!s) return s.error();
  return detail::signal_event(**s);
}

error_code event::reset() const {
  auto s = checked(type_);
  if (!s) return s.error();
  return detail::reset_event(**s);
}

error_code mutex::release() const {
  auto s = checked(object_type::mutex);
  if (!s) return s.error();
  return detail::release_mutex(**s);
}

result<std::uint32_t> semaphore::release(std::uint32_t count) const {
  auto s = checked(object_type::semaphore);
  if (!s) return s.error();
  return detail::release_semaphore(**s, count);
}

// ---- scratch ------------------------------------------------------------------------

scratch_block::scratch_block(scratch_block&& other) noexcept
    : session_(std::move(other.session_)), offset_(other.offset_), data_(other.data_) {
  other.session_.reset();
}

scratch_block& scratch_block::operator=(scratch_block&& other) noexcept {
  if (this != &other) {
    free();
    session_ = std::move(other.session_);
    other.session_.reset();
    offset_ = other.offset_;
    data_ = other.data_;
  }
  return *this;
}

scratch_block::~scratch_block() {
  if (session_ && session_->usable()) {
    pb::ScratchFreeRequest in;
    in.set_offset(offset_);
    session_->post(request_type::scratch_free, in.SerializeAsString());
  }
}

error_code scratch_block::free() {
  if (!session_) return {};
  auto s = std::move(session_);
  session_.reset();
  data_ = {};
  if (!s->usable()) return s->map->lost_reason();
  pb::ScratchFreeRequest in;
  in.set_offset(offset_);
  auto reply = s->call(request_type::scratch_free, in.SerializeAsString());
  return reply ? error_code{} : reply.error();
}

}  // namespace uipc::handles
