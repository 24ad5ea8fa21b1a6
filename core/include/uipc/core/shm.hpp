// Shared-memory segments with a checked header, named or memfd-backed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "uipc/core/error.hpp"
#include "uipc/core/unique_fd.hpp"

namespace uipc {

/// What a segment holds: a reader refuses one whose magic or version differ.
struct segment_identity {
  std::uint64_t magic = 0;
  std::uint32_t version = 0;
};

/// A mapped shared-memory segment: a header (magic, version, size, creator pid)
/// followed by the user's area, 64-byte aligned. Created either under a name
/// (POSIX shared memory through Boost.Interprocess) or anonymously (memfd,
/// sealed against resizing, passed to other processes as a descriptor).
///
/// Move-only. The creator of a named segment owns its name: the destructor
/// removes it, and so does normal process exit (std::exit) if the destructor
/// never ran. Mapping stays valid in other processes until they unmap.
/// Threading: the object itself is not synchronized; the memory is shared.
class shm_segment {
 public:
  /// Creates a new named segment with `size` usable bytes; EEXIST (system
  /// category) if the name exists, EINVAL for a name that breaks the rules.
  /// `name`: letters, digits, '_', '-', '.'; at most 200 bytes.
  static result<shm_segment> create(const std::string& name, std::size_t size, segment_identity id,
                                    unsigned mode = 0600);
  /// Creates an anonymous segment backed by a memfd; share it with fd().
  static result<shm_segment> create_anonymous(std::size_t size, segment_identity id);
  /// Maps an existing named segment; errc::bad_segment if its header does not
  /// match `id`, or if it belongs to another user or is writable by others.
  static result<shm_segment> open(const std::string& name, segment_identity id);
  /// Maps a segment received as a descriptor; errc::bad_segment as for open(),
  /// and for one that is not sealed against shrinking or is over `max_size`.
  static result<shm_segment> open_fd(unique_fd fd, segment_identity id,
                                     std::size_t max_size = std::size_t{1} << 32);
  /// Removes a named segment (e.g. one left by a killed owner). No error if absent.
  static error_code remove(const std::string& name);

  shm_segment(shm_segment&&) noexcept;
  shm_segment& operator=(shm_segment&&) noexcept;
  ~shm_segment();

  /// The user's area.
  void* data() const noexcept;
  std::size_t size() const noexcept;
  /// The pid that created the segment.
  std::int32_t creator_pid() const noexcept;
  /// The backing descriptor of an anonymous segment (-1 for named ones).
  int fd() const noexcept;
  const std::string& name() const noexcept;
  bool owns_name() const noexcept;

  struct impl;

 private:
  explicit shm_segment(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

}  // namespace uipc
