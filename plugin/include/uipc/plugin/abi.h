/* uipc/plugin/abi.h: the C ABI between the uipc plug-in host and its plug-ins.
 *
 * A plug-in is a shared object exporting one function, uipc_plugin_entry
 * (UIPC_PLUGIN_ENTRY_SYMBOL). The host calls it once (the Register command)
 * and gets the plug-in's description; then it calls init, before it serves on
 * more than one thread, and shutdown at the end.
 *
 * Compatibility: every struct crossing the boundary starts with its size in
 * bytes and only ever grows at its end. Whoever reads a struct reads only the
 * fields inside the size its writer gave, and takes zero for the rest
 * (UIPC_PLUGIN_HAS tells whether a field is there). A plug-in built against an
 * older minor version loads in a newer host and the other way round; a plug-in
 * of another major version is refused.
 *
 * Compiles as C99 and as C++. */
#ifndef UIPC_PLUGIN_ABI_H
#define UIPC_PLUGIN_ABI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define UIPC_PLUGIN_ABI_MAJOR 1u
#define UIPC_PLUGIN_ABI_MINOR 0u
#define UIPC_PLUGIN_ENTRY_SYMBOL "uipc_plugin_entry"

#if defined(__GNUC__)
#define UIPC_PLUGIN_EXPORT __attribute__((visibility("default")))
#else
#define UIPC_PLUGIN_EXPORT
#endif

/* Whether the struct at `s` (whose first member is its size) holds `field`. */
#define UIPC_PLUGIN_HAS(s, type, field) \
  ((s)->size >= offsetof(type, field) + sizeof(((type*)0)->field))

/* Status codes. Values are stable; new ones go at the end. The same values
 * are uipc::plugin::errc in C++ (uipc/plugin/error.hpp). */
typedef enum uipc_plugin_status {
  UIPC_PLUGIN_OK = 0,
  UIPC_PLUGIN_E_INVALID_NAME = 1,           /* a name breaks the rules */
  UIPC_PLUGIN_E_DUPLICATE_SERVICE = 2,      /* another plug-in registered this service name */
  UIPC_PLUGIN_E_SERVICE_NOT_FOUND = 3,      /* no service of this name (or it went away) */
  UIPC_PLUGIN_E_SERVICE_NOT_COMPATIBLE = 4, /* the host cannot bridge caller and service */
  UIPC_PLUGIN_E_NOT_OWNER = 5,              /* the service belongs to another plug-in */
  UIPC_PLUGIN_E_WRONG_CONTEXT = 6,          /* memory given by another context or pool */
  UIPC_PLUGIN_E_DOUBLE_FREE = 7,            /* the block was already freed */
  UIPC_PLUGIN_E_MEMORY_LIMIT = 8,           /* the request's memory limit is reached */
  UIPC_PLUGIN_E_NO_MEMORY = 9,              /* the system has no memory to give */
  UIPC_PLUGIN_E_CONTEXT_BUSY = 10,          /* another thread is using this context */
  UIPC_PLUGIN_E_INVALID_ARGUMENT = 11,      /* a null or malformed argument */
  UIPC_PLUGIN_E_TIMED_OUT = 12,             /* the call's deadline passed */
  UIPC_PLUGIN_E_PLUGIN_FAILED = 13,         /* the plug-in threw, crashed or returned garbage */
  UIPC_PLUGIN_E_ABI_MISMATCH = 14,          /* another major ABI version, or a truncated struct */
  UIPC_PLUGIN_E_NO_ENTRY_POINT = 15,        /* the shared object exports no uipc_plugin_entry */
  UIPC_PLUGIN_E_INIT_FAILED = 16,           /* the plug-in's init refused */
  UIPC_PLUGIN_E_LOAD_FAILED = 17,           /* the shared object did not load */
  UIPC_PLUGIN_E_DUPLICATE_PLUGIN = 18,      /* a plug-in of this name is loaded */
  UIPC_PLUGIN_E_PLUGIN_NOT_FOUND = 19,      /* no plug-in of this name is loaded */
  UIPC_PLUGIN_E_UNAVAILABLE =
      20,                     /* the isolated plug-in's process is down (restarting or stopped) */
  UIPC_PLUGIN_E_STOPPED = 21, /* the host is shutting down */
  UIPC_PLUGIN_E_TOO_MANY = 22 /* the host's limit of services or contexts is reached */
} uipc_plugin_status;

/* Opaque handles the host gives out. */
typedef struct uipc_plugin_context
    uipc_plugin_context; /* one request, or one of a plug-in's own threads */
typedef struct uipc_plugin_pool uipc_plugin_pool; /* memory of a context, or a sub-pool of it */
typedef struct uipc_plugin_service_ref uipc_plugin_service_ref; /* a resolved service name */

/* A service. `arg` is what the caller passed: for a bytes service, a
 * uipc_plugin_bytes_call; for a pointer service, anything the two plug-ins
 * agree on. The return value is the call's result (the caller's `*result`).
 * `data` is what the service was registered with. */
typedef uint64_t (*uipc_plugin_service_fn)(uipc_plugin_context* ctx, void* data, void* arg);

/* Service flags. */
#define UIPC_PLUGIN_SERVICE_BYTES \
  0x1u /* arg is a uipc_plugin_bytes_call: callable across processes */

/* The argument of a bytes service: request bytes in, reply bytes out. The
 * service allocates `out` from the caller's context (pool_alloc on
 * context_pool(ctx)); it lives until that context ends. */
typedef struct uipc_plugin_bytes_call {
  uint32_t size; /* sizeof(uipc_plugin_bytes_call) as the caller knows it */
  uint32_t reserved;
  const void* in;
  size_t in_size;
  void* out; /* set by the service; may stay NULL */
  size_t out_size;
} uipc_plugin_bytes_call;

/* What a service event tells. */
typedef enum uipc_plugin_service_event {
  UIPC_PLUGIN_SERVICE_ADDED = 1,
  UIPC_PLUGIN_SERVICE_REMOVED = 2,
  UIPC_PLUGIN_SERVICE_REPLACED = 3 /* the same name, now served by a new build of its plug-in */
} uipc_plugin_service_event;

/* The host's callbacks, given to init. Every callback taking a context may
 * yield: while it waits, another thread may enter a cooperative plug-in.
 * Callbacks return a uipc_plugin_status unless said otherwise. */
typedef struct uipc_plugin_host_api {
  uint32_t size;
  uint16_t abi_major;
  uint16_t abi_minor;

  /* Services. Names: letters, digits, '_' and ' ', 1 to 63 bytes. A null fn
   * unregisters the caller's own service of that name. */
  int (*register_service)(uipc_plugin_context* ctx, const char* name, uipc_plugin_service_fn fn,
                          void* data, uint32_t flags);
  int (*call_service)(uipc_plugin_context* ctx, const char* name, void* arg, uint64_t* result);
  /* Resolves a name once; the reference stays valid for the host's life and
   * follows the name (a reload, an unregistration, a new registration). */
  int (*resolve_service)(uipc_plugin_context* ctx, const char* name,
                         const uipc_plugin_service_ref** out);
  int (*call_resolved)(uipc_plugin_context* ctx, const uipc_plugin_service_ref* ref, void* arg,
                       uint64_t* result);
  /* The registered services' names, TAB-delimited, in memory of ctx's pool. */
  int (*list_services)(uipc_plugin_context* ctx, char** out, size_t* length);

  /* Memory. A block goes back (free, realloc) to the pool that gave it. A
   * failed realloc leaves the old block valid. Everything a pool gave is
   * released when its context ends (or the sub-pool is destroyed). */
  uipc_plugin_pool* (*context_pool)(uipc_plugin_context* ctx);
  int (*pool_alloc)(uipc_plugin_pool* pool, size_t size, void** out);
  int (*pool_realloc)(uipc_plugin_pool* pool, void* block, size_t size, void** out);
  int (*pool_free)(uipc_plugin_pool* pool, void* block);
  int (*pool_create_sub)(uipc_plugin_pool* parent, uipc_plugin_pool** out);
  int (*pool_destroy_sub)(uipc_plugin_pool* pool);
  /* Cleanups run in reverse order of registration when the pool is released.
   * A cleanup a plug-in registers on a context it did not make keeps it
   * loaded, its Shutdown waiting too, until the cleanup has run. */
  int (*pool_cleanup)(uipc_plugin_pool* pool, void (*fn)(void* data), void* data);

  /* Out-of-context contexts for a plug-in's own threads. context_new is
   * thread-safe; `parent` is a context of the plug-in (so the host knows
   * whose thread it is). A context is used by one thread at a time.
   * context_dispose refuses a context in use by a call (also of this thread:
   * UIPC_PLUGIN_E_CONTEXT_BUSY), one disposed already and a request's
   * (UIPC_PLUGIN_E_INVALID_ARGUMENT). */
  int (*context_new)(uipc_plugin_context* parent, uipc_plugin_context** out);
  int (*context_dispose)(uipc_plugin_context* ctx);

  /* Yield points for a plug-in's own waiting: between blocking_begin and
   * blocking_end another thread may enter this (cooperative) plug-in. */
  int (*blocking_begin)(uipc_plugin_context* ctx);
  int (*blocking_end)(uipc_plugin_context* ctx);
  /* Waits until `fd` is ready for `events` (poll(2) events) or timeout_ms
   * passes (-1: no timeout); *revents gets what happened (0: timed out). */
  int (*wait_fd)(uipc_plugin_context* ctx, int fd, short events, int timeout_ms, short* revents);

  /* A readable text for a status code (static storage). */
  const char* (*status_text)(int status);
  /* A line for the host's log. level: 0 error, 1 warning, 2 info, 3 debug. */
  void (*log)(uipc_plugin_context* ctx, int level, const char* message);
} uipc_plugin_host_api;

/* Plug-in flags. */
#define UIPC_PLUGIN_PREEMPTIVE 0x100u /* thread-safe: may run on several threads at once */

/* What a plug-in declares at Register. */
typedef struct uipc_plugin_info {
  uint32_t size;      /* sizeof(uipc_plugin_info) as the plug-in knows it */
  uint16_t abi_major; /* UIPC_PLUGIN_ABI_MAJOR the plug-in was built with */
  uint16_t abi_minor;
  const char* name; /* letters, digits, '_' and '.', 1 to 63 bytes */
  uint32_t flags;   /* UIPC_PLUGIN_PREEMPTIVE, or 0 for cooperative */
  uint32_t reserved;
  /* Init: register services here; `host` stays valid until shutdown returns.
   * Non-zero refuses the load (the host reports the value). */
  int (*init)(uipc_plugin_context* ctx, const uipc_plugin_host_api* host);
  /* Shutdown: the last call the plug-in gets; no call of its services runs
   * or follows. Stop the plug-in's own threads here. May be null. */
  void (*shutdown)(uipc_plugin_context* ctx);
  /* Told when services come and go (not for the plug-in's own). May be null. */
  void (*service_event)(uipc_plugin_context* ctx, const char* name, int event);
} uipc_plugin_info;

/* The entry point: the Register command. The host passes its own ABI version;
 * the plug-in returns its description (static storage), or null to refuse. */
typedef const uipc_plugin_info* (*uipc_plugin_entry_fn)(uint32_t host_abi_major,
                                                        uint32_t host_abi_minor);

#ifdef __cplusplus
}
#endif

#endif /* UIPC_PLUGIN_ABI_H */
