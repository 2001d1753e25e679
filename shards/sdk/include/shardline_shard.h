/*
 * shardline_shard.h — the Shardline capability-shard ABI, version 1, for C.
 *
 * Hand-written mirror of `shards/sdk/src/lib.rs` (the Rust SDK is the
 * reference); `agent/tests/shard_c_abi.rs` compiles this header, checks every
 * size and offset below against the Rust structs, and loads a C shard built
 * with it through the agent's real host process.
 *
 * A shard is a shared library exporting ONE entry symbol per ABI version:
 *
 *     const ShardlineShardDescriptorV1 *shardline_shard_entry_v1(void);
 *
 * It returns a pointer to static, immutable data that lives as long as the
 * library is mapped.
 *
 * Rules a C shard must follow (the host checks what it can and kills the
 * host process otherwise; it never trusts a shard's memory):
 *
 *  - Strings are (pointer, length) pairs of UTF-8 bytes, NOT NUL-terminated;
 *    `len` excludes any terminator you may have. Descriptor strings are at
 *    most 256 bytes; `id`, `version`, `capability` must match the signed
 *    instruction (`id@version`, capability name) or the library is refused.
 *  - Layout is the platform C ABI (`#[repr(C)]` on the Rust side). There is
 *    implicit padding: 4 bytes after `kind` and inside ShardlineResourceCostV1
 *    (after `cpu_permille`) on 64-bit targets, and 4 bytes after
 *    `struct_size` in ShardlineHostApiV1. Do not pack these structs.
 *    Sizes on x86-64 / aarch64: descriptor 104, host API 40, vtable 48,
 *    stats 48, cost 16 (on armv7: 60, 20, 24, 48, 16).
 *  - `struct_size` is sizeof(ShardlineShardDescriptorV1) of the version you
 *    were built against; later versions only append fields.
 *  - `init` must write a NON-NULL handle to `*out_handle` and return >= 0 on
 *    success; a success with a NULL handle is treated as SHARDLINE_INVALID.
 *    The host passes the same handle back to every other call and never
 *    dereferences it. `destroy` is called exactly once per successful init.
 *  - `fds` may write at most `cap` descriptors; the host passes cap = 16, so
 *    at most 16 descriptors are waited on per shard.
 *  - Calls into one shard come from one thread at a time. `poll` must not
 *    block: return the descriptors you wait on through `fds` and the time
 *    (`*out_next_ms`, same clock as `now_ms`) you want to be polled again.
 *    A shard that blocks in a call for ~3 heartbeat periods (300 ms by
 *    default) is reported hung and its host is killed.
 *  - Do not let C++ exceptions or longjmp cross these functions.
 *  - Shards run sandboxed: no capabilities, an unprivileged uid, no file
 *    writes, reads only of the shard directory and system libraries, no
 *    fork/exec, no signals to other processes, no raw or packet sockets.
 *    Privileged resources arrive as descriptors in the configuration (e.g.
 *    `tun_fd = N` for a declared `tun = NAME`).
 *  - The host API table passed to `init` stays valid until `destroy`
 *    returns; copy it, and check `struct_size >= sizeof(ShardlineHostApiV1)`.
 */
#ifndef SHARDLINE_SHARD_H
#define SHARDLINE_SHARD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SHARDLINE_ABI_VERSION_V1 1u
#define SHARDLINE_ENTRY_SYMBOL_V1 "shardline_shard_entry_v1"
/* Most descriptors the host asks `fds` for. */
#define SHARDLINE_MAX_FDS 16u

/* Status codes: non-negative is success. */
#define SHARDLINE_OK 0
#define SHARDLINE_ERROR (-1)
#define SHARDLINE_PANICKED (-2)
#define SHARDLINE_INVALID (-3)
#define SHARDLINE_BUFFER_TOO_SMALL (-4)
#define SHARDLINE_NO_SUCH_SERVICE (-5)
#define SHARDLINE_NOT_READY (-6)
#define SHARDLINE_AUTH_FAILED (-7)
#define SHARDLINE_BUSY (-8)

/* Shard kinds. */
#define SHARDLINE_KIND_COMPUTE 0u
#define SHARDLINE_KIND_DATA 1u

/* Log levels for ShardlineHostApiV1.log. */
#define SHARDLINE_LEVEL_ERROR 1u
#define SHARDLINE_LEVEL_WARN 2u
#define SHARDLINE_LEVEL_INFO 3u
#define SHARDLINE_LEVEL_DEBUG 4u

/* A borrowed UTF-8 string: NOT NUL-terminated. */
typedef struct ShardlineStrRef {
    const char *ptr;
    size_t len;
} ShardlineStrRef;

/* Initialiser for a string literal (length without the terminator). */
#define SHARDLINE_STR(lit) { (lit), sizeof(lit) - 1 }

typedef struct ShardlineResourceCostV1 {
    uint32_t cpu_permille; /* CPU at declared load, per mille of one core */
    /* 4 bytes of padding on 64-bit and armv7 (u64 is 8-aligned) */
    uint64_t memory_bytes;
} ShardlineResourceCostV1;

typedef struct ShardlineShardStatsV1 {
    uint64_t packets_in;
    uint64_t packets_out;
    uint64_t bytes_in;
    uint64_t bytes_out;
    uint64_t dropped;
    uint64_t errors;
} ShardlineShardStatsV1;

typedef struct ShardlineHostApiV1 {
    uint32_t struct_size;
    /* 4 bytes of padding on 64-bit targets */
    void *ctx; /* pass back unchanged on every call */
    void (*log)(void *ctx, uint32_t level, const uint8_t *msg, size_t len);
    void (*metric)(void *ctx, const uint8_t *name, size_t name_len, int64_t value);
    /* Calls `method` of the shard providing `service` in the same host. */
    int32_t (*call_service)(void *ctx, const uint8_t *service, size_t service_len,
                            uint32_t method, const uint8_t *input, size_t input_len,
                            uint8_t *out, size_t out_cap, size_t *out_len);
} ShardlineHostApiV1;

typedef struct ShardlineShardVtableV1 {
    int32_t (*init)(const ShardlineHostApiV1 *host, const uint8_t *config,
                    size_t config_len, void **out_handle);
    int32_t (*poll)(void *handle, uint64_t now_ms, uint64_t *out_next_ms);
    int32_t (*fds)(void *handle, int32_t *out, size_t cap, size_t *out_len);
    int32_t (*call)(void *handle, uint32_t method, const uint8_t *input, size_t input_len,
                    uint8_t *out, size_t out_cap, size_t *out_len);
    int32_t (*stats)(void *handle, ShardlineShardStatsV1 *out);
    void (*destroy)(void *handle);
} ShardlineShardVtableV1;

typedef struct ShardlineShardDescriptorV1 {
    uint32_t abi_version; /* SHARDLINE_ABI_VERSION_V1 */
    uint32_t struct_size; /* sizeof(ShardlineShardDescriptorV1) */
    ShardlineStrRef id;
    ShardlineStrRef version;
    ShardlineStrRef capability;
    ShardlineStrRef service; /* name other shards call it by */
    uint32_t kind;           /* SHARDLINE_KIND_* */
    /* 4 bytes of padding on 64-bit targets */
    ShardlineResourceCostV1 cost;
    const ShardlineShardVtableV1 *vtable;
} ShardlineShardDescriptorV1;

/* The entry point a shard exports. */
const ShardlineShardDescriptorV1 *shardline_shard_entry_v1(void);

#ifdef __cplusplus
}
#endif

#endif /* SHARDLINE_SHARD_H */
