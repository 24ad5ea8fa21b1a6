// Shared-memory segments: header checks, anonymous segments by descriptor, cleanup.
#include "uipc/core/shm.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <string>

namespace {
// A sender racing open_fd: when fstat(2) is called on this descriptor (once),
// the memfd is shrunk to 4096 bytes and sealed right after the size was read,
// as a hostile sender could do between the receiver's two looks.
std::atomic<int> shrink_after_fstat{-1};
}  // namespace

// Interposed on libc's fstat for the whole test binary: the kernel's fstat,
// plus the race above when armed. (glibc >= 2.33 exports fstat itself; the
// kernel's struct stat is glibc's on x86-64 and on the 64-bit generic ABI.)
extern "C" int fstat(int fd, struct stat* st) {
  const long r = ::syscall(SYS_fstat, fd, st);
  int armed = fd;
  if (r == 0 && shrink_after_fstat.compare_exchange_strong(armed, -1)) {
    const int saved = errno;
    (void)::ftruncate(fd, 4096);
    (void)::fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
    errno = saved;
  }
  return r == 0 ? 0 : -1;
}

namespace uipc {
namespace {

constexpr segment_identity test_id{0x7465737473686d31ull, 3};

std::string unique_name(const char* what) {
  return std::string("uipc-test-") + what + "-" + std::to_string(::getpid());
}

bool name_exists(const std::string& name) {
  return ::access(("/dev/shm/" + name).c_str(), F_OK) == 0;
}

// Every test leaves /dev/shm as it found it.
class ShmLeakCheck : public ::testing::EmptyTestEventListener {
  void OnTestEnd(const ::testing::TestInfo& info) override {
    if (std::string(info.test_suite_name()) != "ShmTest") return;
    const std::string mine = "-" + std::to_string(::getpid());
    for (const auto& e : std::filesystem::directory_iterator("/dev/shm")) {
      const std::string n = e.path().filename().string();
      if (n.starts_with("uipc-test-") && n.ends_with(mine)) {
        ADD_FAILURE() << info.name() << " left " << n;
        ::shm_unlink(("/" + n).c_str());
      }
    }
  }
};
const bool leak_check_installed = [] {
  ::testing::UnitTest::GetInstance()->listeners().Append(
      new ShmLeakCheck);  // NOLINT(cppcoreguidelines-owning-memory): gtest owns listeners
  return true;
}();

TEST(ShmTest, CreatedSegmentIsSeenByAnOpener) {
  const auto name = unique_name("seen");
  auto created = shm_segment::create(name, 4096, test_id);
  ASSERT_TRUE(created) << created.error().message();
  std::strcpy(static_cast<char*>(created->data()), "hello");
  auto opened = shm_segment::open(name, test_id);
  ASSERT_TRUE(opened) << opened.error().message();
  EXPECT_STREQ(static_cast<const char*>(opened->data()), "hello");
  EXPECT_EQ(opened->size(), 4096u);
  EXPECT_EQ(opened->creator_pid(), ::getpid());
  EXPECT_FALSE(opened->owns_name());
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(created->data()) % 64, 0u);
}

TEST(ShmTest, WrongMagicOrVersionIsRefused) {
  const auto name = unique_name("foreign");
  auto created = shm_segment::create(name, 128, test_id);
  ASSERT_TRUE(created);
  EXPECT_EQ(shm_segment::open(name, {test_id.magic + 1, test_id.version}).error(),
            make_error_code(errc::bad_segment));
  EXPECT_EQ(shm_segment::open(name, {test_id.magic, test_id.version + 1}).error(),
            make_error_code(errc::bad_segment));
}

TEST(ShmTest, SegmentWithoutAHeaderIsRefused) {
  const auto name = unique_name("raw");
  int fd = ::shm_open(("/" + name).c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::ftruncate(fd, 16), 0);
  ::close(fd);
  EXPECT_EQ(shm_segment::open(name, test_id).error(), make_error_code(errc::bad_segment));
  EXPECT_FALSE(shm_segment::remove(name));
  EXPECT_FALSE(name_exists(name));
}

TEST(ShmTest, CreatingAnExistingNameFails) {
  const auto name = unique_name("twice");
  auto first = shm_segment::create(name, 128, test_id);
  ASSERT_TRUE(first);
  auto second = shm_segment::create(name, 128, test_id);
  ASSERT_FALSE(second);
  EXPECT_EQ(second.error(), boost::system::errc::file_exists);
  EXPECT_TRUE(name_exists(name)) << "the failed create must not remove the first one's name";
}

TEST(ShmTest, BadNamesAreRefused) {
  for (const char* bad : {"", "a/b", "..", "with space", "nul\x01"}) {
    EXPECT_EQ(shm_segment::create(bad, 64, test_id).error(), boost::system::errc::invalid_argument)
        << bad;
  }
}

TEST(ShmTest, DestructorRemovesTheName) {
  const auto name = unique_name("dtor");
  {
    auto s = shm_segment::create(name, 64, test_id);
    ASSERT_TRUE(s);
    EXPECT_TRUE(name_exists(name));
    EXPECT_EQ(::access(("/dev/shm/" + name).c_str(), R_OK), 0);
  }
  EXPECT_FALSE(name_exists(name));
}

TEST(ShmTest, NormalExitWithoutDestructorRemovesTheName) {
  const auto name = unique_name("exit");
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto s = shm_segment::create(name, 64, test_id);
    if (!s || !name_exists(name)) ::_exit(3);
    std::exit(0);  // skips the destructor of `s`
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  ASSERT_EQ(WEXITSTATUS(status), 0);
  EXPECT_FALSE(name_exists(name));
}

TEST(ShmTest, ForkedChildExitingDoesNotRemoveTheParentsSegment) {
  const auto name = unique_name("forked");
  auto s = shm_segment::create(name, 64, test_id);
  ASSERT_TRUE(s);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) std::exit(0);  // runs the atexit cleanup in the child
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_TRUE(name_exists(name)) << "the child removed a segment it does not own";
}

TEST(ShmTest, SegmentOfAnotherUserIsRefused) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to give a segment away";
  const auto name = unique_name("foreign-owner");
  auto s = shm_segment::create(name, 64, test_id);
  ASSERT_TRUE(s);
  ASSERT_EQ(::chown(("/dev/shm/" + name).c_str(), 65534, 65534), 0);
  EXPECT_EQ(shm_segment::open(name, test_id).error(), make_error_code(errc::bad_segment));
}

TEST(ShmTest, SegmentWritableByOthersIsRefused) {
  const auto name = unique_name("open-mode");
  auto s = shm_segment::create(name, 64, test_id, 0666);
  ASSERT_TRUE(s);
  ASSERT_EQ(::chmod(("/dev/shm/" + name).c_str(), 0666), 0);
  EXPECT_EQ(shm_segment::open(name, test_id).error(), make_error_code(errc::bad_segment));
}

TEST(ShmTest, OversizedDescriptorIsRefused) {
  auto created = shm_segment::create_anonymous(1 << 20, test_id);
  ASSERT_TRUE(created);
  auto opened = shm_segment::open_fd(unique_fd(::dup(created->fd())), test_id, /*max_size=*/4096);
  EXPECT_EQ(opened.error(), make_error_code(errc::bad_segment));
}

TEST(ShmTest, SegmentIsPrivateToItsOwner) {
  const auto name = unique_name("mode");
  auto s = shm_segment::create(name, 64, test_id);
  ASSERT_TRUE(s);
  struct stat st {};
  ASSERT_EQ(::stat(("/dev/shm/" + name).c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

TEST(ShmTest, AnonymousSegmentTravelsAsADescriptor) {
  auto created = shm_segment::create_anonymous(1 << 16, test_id);
  ASSERT_TRUE(created);
  std::strcpy(static_cast<char*>(created->data()), "by descriptor");
  auto opened = shm_segment::open_fd(unique_fd(::dup(created->fd())), test_id);
  ASSERT_TRUE(opened) << opened.error().message();
  EXPECT_STREQ(static_cast<const char*>(opened->data()), "by descriptor");
  EXPECT_EQ(opened->size(), 1u << 16);
  EXPECT_EQ(::ftruncate(created->fd(), 10), -1) << "sealed against shrinking";
}

TEST(ShmTest, ADescriptorShrunkAndSealedWhileItIsOpenedIsNeverMappedPastItsEnd) {
  // A valid segment in a memfd its sender has not sealed yet.
  auto model = shm_segment::create_anonymous(1 << 16, test_id);
  ASSERT_TRUE(model);
  struct stat st {};
  ASSERT_EQ(::fstat(model->fd(), &st), 0);
  std::string bytes(static_cast<std::size_t>(st.st_size), '\0');
  ASSERT_EQ(::pread(model->fd(), bytes.data(), bytes.size(), 0), st.st_size);
  const int fd = ::memfd_create("racing-sender", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::write(fd, bytes.data(), bytes.size()), st.st_size);
  unique_fd check(::dup(fd));
  // The sender shrinks and seals it between the receiver's look at the size
  // and its look at the seals: a mapping of the old size would SIGBUS past
  // the new end. Refused, or mapped within the file, are both right.
  shrink_after_fstat.store(fd);
  auto opened = shm_segment::open_fd(unique_fd(fd), test_id);
  shrink_after_fstat.store(-1);
  ASSERT_EQ(::fstat(check.get(), &st), 0);
  if (opened) {
    EXPECT_LE(opened->size(), static_cast<std::size_t>(st.st_size)) << "mapped past the end";
  } else {
    EXPECT_EQ(opened.error(), make_error_code(errc::bad_segment));
  }
}

TEST(ShmTest, UnsealedDescriptorIsRefused) {
  int fd = ::memfd_create("not-ours", MFD_CLOEXEC);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::ftruncate(fd, 4096), 0);
  EXPECT_EQ(shm_segment::open_fd(unique_fd(fd), test_id).error(),
            make_error_code(errc::bad_segment));
}

}  // namespace
}  // namespace uipc
