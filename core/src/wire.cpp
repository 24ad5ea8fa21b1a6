// Frame encoding and decoding, and errors on the wire.
#include "wire.hpp"

#include <cerrno>
#include <limits>

#include "uipc/proto/envelope.pb.h"

namespace uipc {

namespace detail {

namespace {

void write_prefix(char* p, std::size_t length) {
  const std::uint32_t v = boost::endian::native_to_little(static_cast<std::uint32_t>(length));
  std::memcpy(p, &v, sizeof v);
}

std::string serialize(const proto::Envelope& env) {
  const std::size_t length = env.ByteSizeLong();
  std::string out(4 + length, '\0');
  write_prefix(out.data(), length);
  env.SerializeWithCachedSizesToArray(
      reinterpret_cast<std::uint8_t*>(out.data() + 4));  // NOLINT: protobuf API
  return out;
}

proto::Envelope::Kind to_proto(frame_kind k) {
  switch (k) {
    case frame_kind::request:
      return proto::Envelope::REQUEST;
    case frame_kind::reply:
      return proto::Envelope::REPLY;
    case frame_kind::notice:
      return proto::Envelope::NOTICE;
  }
  return proto::Envelope::NOTICE;
}

}  // namespace

result<std::string> encode_frame(frame& f, std::size_t max_frame_size) {
  if (f.fds.size() > std::numeric_limits<std::uint32_t>::max())
    return make_error_code(errc::too_many_fds);
  proto::Envelope env;
  env.set_kind(to_proto(f.kind));
  env.set_correlation_id(f.correlation_id);
  env.set_type(f.type);
  env.set_payload(std::move(f.payload));
  if (f.error) {
    auto* e = env.mutable_error();
    e->set_category(f.error->category);
    e->set_value(f.error->value);
    e->set_message(f.error->message);
  }
  env.set_fd_count(static_cast<std::uint32_t>(f.fds.size()));
  if (env.ByteSizeLong() > max_frame_size ||
      env.ByteSizeLong() > std::numeric_limits<std::uint32_t>::max()) {
    f.payload = std::move(*env.mutable_payload());  // give it back: nothing was sent
    return make_error_code(errc::frame_too_large);
  }
  return serialize(env);
}

result<frame> decode_frame(proto::Envelope& env, const char* data, std::size_t length,
                           std::deque<unique_fd>& fds, std::size_t max_fds) {
  if (!env.ParseFromArray(data, static_cast<int>(length))) return make_error_code(errc::bad_frame);
  if (!proto::Envelope::Kind_IsValid(env.kind())) return make_error_code(errc::bad_frame);
  if (env.fd_count() > max_fds) return make_error_code(errc::too_many_fds);
  if (env.fd_count() > fds.size()) return make_error_code(errc::bad_frame);
  frame f;
  switch (env.kind()) {
    case proto::Envelope::REQUEST:
      f.kind = frame_kind::request;
      break;
    case proto::Envelope::REPLY:
      f.kind = frame_kind::reply;
      break;
    default:
      f.kind = frame_kind::notice;
      break;
  }
  if (f.kind != frame_kind::notice && env.correlation_id() == 0)
    return make_error_code(errc::bad_frame);
  f.correlation_id = env.correlation_id();
  f.type = env.type();
  f.payload = std::move(*env.mutable_payload());
  if (env.has_error()) {
    f.error = wire_error{env.error().category(), env.error().value(), env.error().message()};
  }
  f.fds.reserve(env.fd_count());
  for (std::uint32_t i = 0; i < env.fd_count(); ++i) {
    f.fds.push_back(std::move(fds.front()));
    fds.pop_front();
  }
  return f;
}

std::string encode_error_notice(error_code ec) {
  proto::Envelope env;
  env.set_kind(proto::Envelope::NOTICE);
  auto* e = env.mutable_error();
  e->set_category(ec.category().name());
  e->set_value(ec.value());
  e->set_message(ec.message());
  return serialize(env);
}

error_code from_wire_error(const wire_error& e,
                           std::span<const boost::system::error_category* const> known) {
  // A peer cannot make a failed call look successful, or cancelled by us.
  if (e.value == 0) return make_error_code(errc::remote_error);
  if ((e.category == boost::system::system_category().name() ||
       e.category == boost::system::generic_category().name()) &&
      e.value == ECANCELED) {
    return make_error_code(errc::remote_error);
  }
  if (e.category == core_category().name()) return {e.value, core_category()};
  if (e.category == boost::system::system_category().name())
    return {e.value, boost::system::system_category()};
  if (e.category == boost::system::generic_category().name())
    return {e.value, boost::system::generic_category()};
  for (const auto* category : known) {
    if (category != nullptr && e.category == category->name()) return {e.value, *category};
  }
  return make_error_code(errc::remote_error);
}

}  // namespace detail

wire_error to_wire_error(error_code ec) { return {ec.category().name(), ec.value(), ec.message()}; }

frame make_reply(const frame& request, std::uint32_t type, std::string payload) {
  frame f;
  f.kind = frame_kind::reply;
  f.correlation_id = request.correlation_id;
  f.type = type;
  f.payload = std::move(payload);
  return f;
}

frame make_error_reply(const frame& request, error_code ec) {
  frame f = make_reply(request, request.type, {});
  f.error = to_wire_error(ec);
  return f;
}

}  // namespace uipc
