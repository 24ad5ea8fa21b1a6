/* hello: an example plug-in in plain C (C99). Cooperative: the host never has
 * two threads inside it. Serves "hello" (bytes: answers "hello, <request>")
 * and "hello count" (bytes: how many greetings it gave, as decimal text). */
#include <stdio.h>
#include <string.h>

#include "uipc/plugin/abi.h"

static const uipc_plugin_host_api* host;
static unsigned long greetings; /* no lock: the plug-in is cooperative */

static uint64_t hello(uipc_plugin_context* ctx, void* data, void* arg) {
  uipc_plugin_bytes_call* call = (uipc_plugin_bytes_call*)arg;
  static const char prefix[] = "hello, ";
  size_t size = sizeof prefix - 1 + call->in_size;
  void* out = NULL;
  (void)data;
  if (host->pool_alloc(host->context_pool(ctx), size, &out) != UIPC_PLUGIN_OK) return 1;
  memcpy(out, prefix, sizeof prefix - 1);
  if (call->in_size) memcpy((char*)out + sizeof prefix - 1, call->in, call->in_size);
  call->out = out;
  call->out_size = size;
  ++greetings;
  return 0;
}

static uint64_t count(uipc_plugin_context* ctx, void* data, void* arg) {
  uipc_plugin_bytes_call* call = (uipc_plugin_bytes_call*)arg;
  char text[32];
  int n = snprintf(text, sizeof text, "%lu", greetings);
  void* out = NULL;
  (void)data;
  if (host->pool_alloc(host->context_pool(ctx), (size_t)n, &out) != UIPC_PLUGIN_OK) return 1;
  memcpy(out, text, (size_t)n);
  call->out = out;
  call->out_size = (size_t)n;
  return 0;
}

static int init(uipc_plugin_context* ctx, const uipc_plugin_host_api* api) {
  int status;
  host = api;
  status = host->register_service(ctx, "hello", hello, NULL, UIPC_PLUGIN_SERVICE_BYTES);
  if (status != UIPC_PLUGIN_OK) return status;
  return host->register_service(ctx, "hello count", count, NULL, UIPC_PLUGIN_SERVICE_BYTES);
}

static void shutdown(uipc_plugin_context* ctx) {
  (void)ctx;
  host = NULL;
}

static const uipc_plugin_info info = {sizeof(uipc_plugin_info),
                                      UIPC_PLUGIN_ABI_MAJOR,
                                      UIPC_PLUGIN_ABI_MINOR,
                                      "hello",
                                      0,
                                      0,
                                      init,
                                      shutdown,
                                      NULL};

UIPC_PLUGIN_EXPORT const uipc_plugin_info* uipc_plugin_entry(uint32_t host_major,
                                                             uint32_t host_minor) {
  (void)host_minor;
  return host_major == UIPC_PLUGIN_ABI_MAJOR ? &info : NULL;
}
