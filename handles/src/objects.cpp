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
#include <utility>

#include "owned_mutexes.hpp"
#include "session.hpp"
#include "slot_state.hpp"
#include "uipc/handles/client.hpp"
#include "uipc/proto/handles.pb.h"

namespace uipc::handles {

namespace pb = uipc::proto::handles;
using detail::request_type;
using steady = std::chrono::steady_clock;

// ---- objects ----------------------------------------------------------------------

object::object(std::shared_ptr<detail::session> s, handle_id h, object_type t, bool existed)
    : session_(std::move(s)), handle_(h), type_(t), existed_(existed) {
  if (!session_) return;
  map_ = session_->map.get();
  const detail::segment_view& v = map_->view;
  header_ = v.header;
  if (h.index < v.capacity() && h.generation != 0) slot_ = &v.at(h.index);
}

object::object(object&& other) noexcept
    : session_(std::move(other.session_)),
      map_(std::exchange(other.map_, nullptr)),
      header_(std::exchange(other.header_, nullptr)),
      slot_(std::exchange(other.slot_, nullptr)),
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
    map_ = std::exchange(other.map_, nullptr);
    header_ = std::exchange(other.header_, nullptr);
    slot_ = std::exchange(other.slot_, nullptr);
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
  map_ = nullptr;
  header_ = nullptr;
  slot_ = nullptr;
  if (!s->usable()) return s->map->lost_reason();
  pb::CloseRequest in;
  in.mutable_handle()->set_index(handle_.index);
  in.mutable_handle()->set_generation(handle_.generation);
  auto reply = s->call(request_type::close, in.SerializeAsString());
  return reply ? error_code{} : reply.error();
}

handle_id object::detach() noexcept {
  session_.reset();
  map_ = nullptr;
  header_ = nullptr;
  slot_ = nullptr;
  return handle_;
}

// Every operation's checks, kept cheap: each word is one load away from a
// pointer the object holds (the locked instruction that follows waits for
// these loads, so their chains are its latency), and the slot comes back in a
// register (a result<slot*> came back through memory, a store-forwarding stall).
// Flattened into each operation (objects.cpp is its only user): the call and
// its register saves were a fifth of a semaphore's release and wait.
[[gnu::always_inline]] inline detail::slot* object::checked(object_type expected,
                                                            error_code& failure) const noexcept {
  detail::slot* s = slot_;
  if (s == nullptr) [[unlikely]] {
    failure = make_error_code(errc::invalid_handle);
    return nullptr;
  }
  // Lost, stopped or dead; or a daemon without a death flag, asked about
  // through the kernel: the mapping's full check decides.
  if ((map_->lost.load() || !detail::daemon_serving(*header_)) && !map_->usable()) [[unlikely]] {
    failure = map_->lost_reason();
    return nullptr;
  }
  if (const errc e = detail::slot_mismatch(*s, handle_.generation, expected); e != errc{})
      [[unlikely]] {
    failure = make_error_code(e);
    return nullptr;
  }
  return s;
}

result<wait_status> object::wait(std::chrono::nanoseconds timeout) const {
  error_code failure;
  detail::slot* s = checked(type_, failure);
  if (s == nullptr) return failure;
  switch (detail::take_now(map_->view, *s, type_)) {  // free: no wait
    case detail::take_outcome::signalled:
      return wait_status::signalled;
    case detail::take_outcome::abandoned:
      return wait_status::abandoned;
    case detail::take_outcome::busy:
      break;
  }
  const detail::wait_target target{s, type_, handle_.generation};
  auto r = detail::wait(map_->view, std::span(&target, 1), false, timeout, session_->options.spin);
  if (!r) return r.error();
  return r->status;
}

error_code event::signal() const {
  error_code failure;
  detail::slot* s = checked(type_, failure);
  if (s == nullptr) return failure;
  return detail::signal_event(*s);
}

error_code event::reset() const {
  error_code failure;
  detail::slot* s = checked(type_, failure);
  if (s == nullptr) return failure;
  return detail::reset_event(*s);
}

error_code mutex::release() const {
  error_code failure;
  detail::slot* s = checked(object_type::mutex, failure);
  if (s == nullptr) return failure;
  return detail::release_mutex(*s, &map_->view);
}

result<std::uint32_t> semaphore::release(std::uint32_t count) const {
  error_code failure;
  detail::slot* s = checked(object_type::semaphore, failure);
  if (s == nullptr) return failure;
  std::uint32_t previous = 0;
  if (const errc e = detail::release_semaphore(*s, count, previous); e != errc{})
    return make_error_code(e);
  return previous;
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
