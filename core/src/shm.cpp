// shm_segment: header layout, creation, checked opening and name cleanup.
#include "uipc/core/shm.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <boost/interprocess/mapped_region.hpp>
#include <boost/interprocess/shared_memory_object.hpp>
#include <cerrno>
#include <cstdlib>
#include <mutex>
#include <optional>
#include <set>

#include "uipc/core/rendezvous.hpp"

namespace uipc {

namespace bip = boost::interprocess;

namespace {

constexpr std::size_t header_size = 64;
constexpr std::size_t max_segment_size = std::size_t{1} << 40;

// The first 64 bytes of every segment. `magic` is stored last, with release
// order, so a reader that sees the magic sees the whole header.
struct segment_header {
  std::atomic<std::uint64_t> magic;
  std::uint32_t version;
  std::uint32_t header_bytes;
  std::uint64_t total_size;
  std::int32_t creator_pid;
};
static_assert(sizeof(segment_header) <= header_size);
static_assert(std::atomic<std::uint64_t>::is_always_lock_free);

error_code system_error(int e) { return {e, boost::system::system_category()}; }

// Names under /dev/shm: one path component. A bad name is EINVAL at this API
// (what shm_open says too), not errc::invalid_name.
constexpr name_rules segment_name_rules{1, 200, "_-."};

bool valid_name(const std::string& name) { return !check_name(name, segment_name_rules); }

error_code from_interprocess(const bip::interprocess_exception& e) {
  const int native = e.get_native_error();
  return system_error(native != 0 ? native : EIO);
}

// Names created by this process and not yet removed: removed at normal exit
// even when no destructor ran (std::exit skips automatic objects).
struct owned_names {
  std::mutex mutex;
  std::set<std::string> names;
  pid_t owner_pid = ::getpid();

  static owned_names& get() {
    static owned_names* instance = [] {
      auto* r = new owned_names;  // NOLINT(cppcoreguidelines-owning-memory): lives until exit, used
                                  // by atexit
      std::atexit([] {
        auto& self = get();
        std::lock_guard lock(self.mutex);
        // A forked child inherits the list but owns none of it.
        if (self.owner_pid == ::getpid()) {
          for (const auto& n : self.names) bip::shared_memory_object::remove(n.c_str());
        }
        self.names.clear();
      });
      return r;
    }();
    return *instance;
  }
  void add(const std::string& n) {
    std::lock_guard lock(mutex);
    if (owner_pid != ::getpid()) {  // first segment made in a forked child
      names.clear();
      owner_pid = ::getpid();
    }
    names.insert(n);
  }
  void erase(const std::string& n) {
    std::lock_guard lock(mutex);
    names.erase(n);
  }
};

void write_header(void* base, std::size_t total, segment_identity id) {
  auto* h = new (base) segment_header{};  // the mapping is fresh and zeroed
  h->version = id.version;
  h->header_bytes = header_size;
  h->total_size = total;
  h->creator_pid = static_cast<std::int32_t>(::getpid());
  h->magic.store(id.magic, std::memory_order_release);
}

error_code check_header(const void* base, std::size_t mapped, segment_identity id) {
  if (mapped < header_size) return make_error_code(errc::bad_segment);
  const auto* h = static_cast<const segment_header*>(base);
  if (h->magic.load(std::memory_order_acquire) != id.magic || h->version != id.version ||
      h->header_bytes != header_size || h->total_size != mapped) {
    return make_error_code(errc::bad_segment);
  }
  return {};
}

}  // namespace

struct shm_segment::impl {
  std::string name;
  bool owns_name = false;
  std::optional<bip::mapped_region> region;  // named segments
  unique_fd memfd;                           // anonymous segments
  void* base = nullptr;
  std::size_t total = 0;

  ~impl() {
    if (!region && base != nullptr) ::munmap(base, total);
    if (owns_name) {
      bip::shared_memory_object::remove(name.c_str());
      owned_names::get().erase(name);
    }
  }
};

shm_segment::shm_segment(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
shm_segment::shm_segment(shm_segment&&) noexcept = default;
shm_segment& shm_segment::operator=(shm_segment&&) noexcept = default;
shm_segment::~shm_segment() = default;

result<shm_segment> shm_segment::create(const std::string& name, std::size_t size,
                                        segment_identity id, unsigned mode) {
  if (!valid_name(name)) return system_error(EINVAL);
  if (size > max_segment_size) return system_error(EFBIG);
  const std::size_t total = header_size + size;
  auto p = std::make_unique<impl>();
  p->name = name;
  try {
    bip::permissions perms(mode);
    bip::shared_memory_object object(bip::create_only, name.c_str(), bip::read_write, perms);
    p->owns_name = true;  // from here on the impl removes the name on any failure
    owned_names::get().add(name);
    object.truncate(static_cast<bip::offset_t>(total));
    p->region.emplace(object, bip::read_write);
  } catch (const bip::interprocess_exception& e) {
    if (!p->owns_name) p->name.clear();
    return from_interprocess(e);
  }
  p->base = p->region->get_address();
  p->total = p->region->get_size();
  write_header(p->base, p->total, id);
  return shm_segment(std::move(p));
}

result<shm_segment> shm_segment::create_anonymous(std::size_t size, segment_identity id) {
  if (size > max_segment_size) return system_error(EFBIG);
  const std::size_t total = header_size + size;
  unique_fd fd(::memfd_create("uipc-segment", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd) return system_error(errno);
  if (::ftruncate(fd.get(), static_cast<off_t>(total)) != 0) return system_error(errno);
  // Sealed: whoever maps it can trust the size (no SIGBUS from a shrink).
  if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0)
    return system_error(errno);
  void* base = ::mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  if (base == MAP_FAILED) return system_error(errno);
  auto p = std::make_unique<impl>();
  p->memfd = std::move(fd);
  p->base = base;
  p->total = total;
  write_header(base, total, id);
  return shm_segment(std::move(p));
}

result<shm_segment> shm_segment::open(const std::string& name, segment_identity id) {
  if (!valid_name(name)) return system_error(EINVAL);
  auto p = std::make_unique<impl>();
  p->name = name;
  try {
    bip::shared_memory_object object(bip::open_only, name.c_str(), bip::read_write);
    // A segment someone else made (squatting on a known name) or that others
    // may write is not ours to trust.
    struct stat st {};
    if (::fstat(object.get_mapping_handle().handle, &st) != 0 || st.st_uid != ::geteuid() ||
        (st.st_mode & 0022) != 0) {
      return make_error_code(errc::bad_segment);
    }
    bip::offset_t size = 0;
    if (!object.get_size(size) || size < static_cast<bip::offset_t>(header_size)) {
      return make_error_code(errc::bad_segment);
    }
    p->region.emplace(object, bip::read_write);
  } catch (const bip::interprocess_exception& e) {
    return from_interprocess(e);
  }
  p->base = p->region->get_address();
  p->total = p->region->get_size();
  if (auto ec = check_header(p->base, p->total, id)) return ec;
  return shm_segment(std::move(p));
}

result<shm_segment> shm_segment::open_fd(unique_fd fd, segment_identity id, std::size_t max_size) {
  // Refuse a segment whose owner could still shrink it under us. The seals
  // first, the size after: read the other way round, a sender could shrink
  // the memfd between the two and then seal it, and the mapping of the size
  // read first would fault (SIGBUS) past the new end.
  const int seals = ::fcntl(fd.get(), F_GET_SEALS);
  if (seals < 0 || (seals & F_SEAL_SHRINK) == 0) return make_error_code(errc::bad_segment);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return system_error(errno);
  const auto total = static_cast<std::size_t>(st.st_size);
  if (total < header_size || total - header_size > std::min(max_size, max_segment_size)) {
    return make_error_code(errc::bad_segment);
  }
  void* base = ::mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
  if (base == MAP_FAILED) return system_error(errno);
  auto p = std::make_unique<impl>();
  p->memfd = std::move(fd);
  p->base = base;
  p->total = total;
  if (auto ec = check_header(base, total, id)) return ec;
  return shm_segment(std::move(p));
}

error_code shm_segment::remove(const std::string& name) {
  if (!valid_name(name)) return system_error(EINVAL);
  bip::shared_memory_object::remove(name.c_str());
  return {};
}

void* shm_segment::data() const noexcept { return static_cast<char*>(impl_->base) + header_size; }
std::size_t shm_segment::size() const noexcept { return impl_->total - header_size; }
std::int32_t shm_segment::creator_pid() const noexcept {
  return static_cast<const segment_header*>(impl_->base)->creator_pid;
}
int shm_segment::fd() const noexcept { return impl_->memfd.get(); }
const std::string& shm_segment::name() const noexcept { return impl_->name; }
bool shm_segment::owns_name() const noexcept { return impl_->owns_name; }

}  // namespace uipc
