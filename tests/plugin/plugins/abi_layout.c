/* Compiled as C99: the ABI header must compile as C, and its layout as C sees
 * it must match what C++ sees (abi_test.cpp compares this table). */
#include <stddef.h>

#include "uipc/plugin/abi.h"

const size_t uipc_test_c_layout[] = {
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
const size_t uipc_test_c_layout_count = sizeof uipc_test_c_layout / sizeof uipc_test_c_layout[0];
