// The C ABI: the header's layout is the same in C99 and C++, and every struct
// starts with its size.
#include "uipc/plugin/abi.h"

#include <gtest/gtest.h>

#include <cstddef>

#include "uipc/plugin/error.hpp"

extern "C" const std::size_t uipc_test_c_layout[];
extern "C" const std::size_t uipc_test_c_layout_count;

namespace {

TEST(Abi, LayoutIsTheSameInCAndCxx) {
  const std::size_t cxx[] = {
      sizeof(uipc_plugin_info),
      offsetof(uipc_plugin_info, name),
      offsetof(uipc_plugin_info, flags),
      offsetof(uipc_plugin_info, init),
      offsetof(uipc_plugin_info, shutdown),
      offsetof(uipc_plugin_info, service_event),
      sizeof(uipc_plugin_host_api),
      offsetof(uipc_plugin_host_api, register_service),
      offsetof(uipc_plugin_host_api, pool_alloc),
      offsetof(uipc_plugin_host_api, context_new),
      offsetof(uipc_plugin_host_api, log),
      sizeof(uipc_plugin_bytes_call),
      offsetof(uipc_plugin_bytes_call, in),
      offsetof(uipc_plugin_bytes_call, out_size),
  };
  ASSERT_EQ(uipc_test_c_layout_count, std::size(cxx));
  for (std::size_t i = 0; i < std::size(cxx); ++i)
    EXPECT_EQ(uipc_test_c_layout[i], cxx[i]) << "row " << i;
}

TEST(Abi, EveryStructStartsWithItsSize) {
  EXPECT_EQ(offsetof(uipc_plugin_info, size), 0u);
  EXPECT_EQ(offsetof(uipc_plugin_host_api, size), 0u);
  EXPECT_EQ(offsetof(uipc_plugin_bytes_call, size), 0u);
  // The fields of version 1.0, at the offsets a 64-bit plug-in built against it expects.
  EXPECT_EQ(offsetof(uipc_plugin_info, name), 8u);
  EXPECT_EQ(offsetof(uipc_plugin_info, init), 24u);
  EXPECT_EQ(offsetof(uipc_plugin_host_api, register_service), 8u);
}

TEST(Abi, HasTellsWhetherAFieldIsThere) {
  uipc_plugin_info info{};
  info.size = offsetof(uipc_plugin_info, service_event);
  EXPECT_TRUE(UIPC_PLUGIN_HAS(&info, uipc_plugin_info, shutdown));
  EXPECT_FALSE(UIPC_PLUGIN_HAS(&info, uipc_plugin_info, service_event));
}

TEST(Abi, StatusCodesAreTheErrcValues) {
  using uipc::plugin::errc;
  EXPECT_EQ(uipc::plugin::status_code(UIPC_PLUGIN_E_SERVICE_NOT_FOUND), errc::service_not_found);
  EXPECT_FALSE(uipc::plugin::status_code(UIPC_PLUGIN_OK));
  EXPECT_STREQ(uipc::plugin::status_text(UIPC_PLUGIN_E_DUPLICATE_SERVICE),
               "another plug-in registered this service name");
  EXPECT_EQ(uipc::plugin::make_error_code(errc::service_not_found), uipc::condition::not_found);
  EXPECT_EQ(std::string(uipc::plugin::plugin_category().name()), "uipc.plugin");
}

}  // namespace
