// TEMPORARY stand-in (not committed): replaced by the pool branch.
#pragma once
#include <cstddef>
#include <cstdlib>
#include "uipc/plugin/abi.h"
namespace uipc::plugin {
class pool_cache { public: std::size_t bytes_cached() const noexcept { return 0; } };
class pool {
 public:
  pool(pool_cache&, std::size_t) {}
  int allocate(std::size_t n, void** out) noexcept { *out = std::malloc(n ? n : 1); return 0; }
  int reallocate(void* b, std::size_t n, void** out) noexcept { *out = std::realloc(b, n); return 0; }
  int free(void* b) noexcept { std::free(b); return 0; }
  int create_sub(pool** out) noexcept { *out = nullptr; return UIPC_PLUGIN_E_NO_MEMORY; }
  int destroy() noexcept { return 0; }
  int add_cleanup(void (*)(void*), void*) noexcept { return 0; }
  void release() noexcept {}
  void* user() const noexcept { return user_; }
  void set_user(void* u) noexcept { user_ = u; }
 private:
  void* user_ = nullptr;
};
}
