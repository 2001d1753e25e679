// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
//
// Per-flow counting in the kernel for shardline-agent's live capture
// (agent/src/monitor/kernel_count.rs loads it; ARCHITECTURE.md says why).
//
// A BPF_PROG_TYPE_SOCKET_FILTER attached (SO_ATTACH_BPF) to the agent's own
// AF_PACKET socket, in front of its TPACKET_V3 ring. For every frame it
// counts packets and IP bytes per flow (5-tuple, both directions folded into
// one entry) in an LRU hash map, and lets the frame through to the ring only
// while the flow still needs it for classification: its first
// `first_packets` packets, TCP packets with a flag in `tcp_flags`, DNS
// (port 53/5353), the first packet after a pause of `gap_ns` (the
// pipeline counts pauses: a video player's, not a download's) and, if
// `sample_every` is not 0, one packet in `sample_every`. A frame it does not let through is counted in the map's
// "skipped" counters, which user space adds to its pipeline, so the totals
// stay exact. Frames it does not read completely (not IPv4/IPv6 TCP/UDP,
// fragments, extension headers, truncated or odd headers) always go through
// uncounted: the pipeline counts them itself, as without this filter.
//
// Self-contained on purpose (no kernel or libbpf headers): the object is
// committed beside this file and must rebuild byte for byte on any host
// (`cargo xtask bpf`; agent/tests/bpf_object.rs checks it). Rebuild with
//   clang-14 -target bpfel -O2 -g -c flow_count.bpf.c -o flow_count.bpf.o
// (the exact flags are in xtask/src/bpf.rs).

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name

// <linux/bpf.h>: helper ids, map types, update flags.
#define BPF_FUNC_map_lookup_elem 1
#define BPF_FUNC_map_update_elem 2
#define BPF_FUNC_ktime_get_ns 5
#define BPF_FUNC_skb_load_bytes 26
#define BPF_MAP_TYPE_ARRAY 2
#define BPF_MAP_TYPE_PERCPU_ARRAY 6
#define BPF_MAP_TYPE_LRU_HASH 9
#define BPF_NOEXIST 1

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;
static long (*bpf_map_update_elem)(void *map, const void *key, const void *value,
                                   __u64 flags) = (void *)BPF_FUNC_map_update_elem;
static __u64 (*bpf_ktime_get_ns)(void) = (void *)BPF_FUNC_ktime_get_ns;
static long (*bpf_skb_load_bytes)(const void *skb, __u32 offset, void *to,
                                  __u32 len) = (void *)BPF_FUNC_skb_load_bytes;

// Only the first field of the context is read.
struct __sk_buff {
    __u32 len;
};

// Must match `FlowKeyRaw` in kernel_count.rs. Endpoint a is the smaller
// (address, port); IPv4 addresses are IPv4-mapped IPv6 (::ffff:a.b.c.d).
struct flow_key {
    __u32 a[4]; // network byte order
    __u32 b[4];
    __u16 a_port;
    __u16 b_port;
    __u8 proto;
    __u8 v6;
    __u8 pad[2];
};

// Must match `FlowValueRaw` in kernel_count.rs. Counters are cumulative
// (never reset by the kernel; user space reads deltas).
struct flow_value {
    __u64 first_ns; // CLOCK_MONOTONIC
    __u64 last_ns;
    __u64 packets[2]; // every packet counted; [0] a -> b, [1] b -> a
    __u64 bytes[2];   // IP bytes (from the IP length fields)
    __u64 skipped_packets[2]; // of those, not let through to the socket
    __u64 skipped_bytes[2];
    __u8 initiator_is_a; // the first packet counted went a -> b
    __u8 pad[7];
};

// Must match `ConfigRaw` in kernel_count.rs.
struct config {
    __u32 first_packets;
    __u32 sample_every; // 0 = no sampling
    __u32 tcp_flags;    // TCP flag bits that always go through
    __u32 link;         // 0 Ethernet, 1 raw IP
    __u64 gap_ns;       // a packet after a pause this long goes through (0 = never)
};

// Indexes of `stats` (per CPU), must match kernel_count.rs.
#define STAT_DELIVERED 0 // counted and let through
#define STAT_SKIPPED 1   // counted and not let through
#define STAT_UNCOUNTED 2 // let through without counting (not read here)
#define STAT_NO_ENTRY 3  // the map refused an entry: let through uncounted
#define NSTATS 4

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 65536); // user space sets the real size before loading
    __type(key, struct flow_key);
    __type(value, struct flow_value);
} flows SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct config);
} config SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, NSTATS);
    __type(key, __u32);
    __type(value, __u64);
} stats SEC(".maps");

static __attribute__((always_inline)) void stat(__u32 i)
{
    __u64 *c = bpf_map_lookup_elem(&stats, &i);
    if (c)
        *c += 1;
}

// The whole frame (the return value is how many bytes the socket keeps).
static __attribute__((always_inline)) int pass(struct __sk_buff *skb, __u32 why)
{
    stat(why);
    return skb->len;
}

static __attribute__((always_inline)) __u16 be16(const __u8 *p)
{
    return ((__u16)p[0] << 8) | p[1];
}

// (x, xp) < (y, yp): addresses compared as bytes in network order.
static __attribute__((always_inline)) int endpoint_less(const __u32 *x, __u16 xp,
                                                        const __u32 *y, __u16 yp)
{
#pragma clang loop unroll(full)
    for (int i = 0; i < 4; i++) {
        __u32 xi = __builtin_bswap32(x[i]), yi = __builtin_bswap32(y[i]);
        if (xi != yi)
            return xi < yi;
    }
    return xp < yp;
}

SEC("socket")
int flow_count(struct __sk_buff *skb)
{
    __u32 zero = 0;
    struct config *cfg = bpf_map_lookup_elem(&config, &zero);
    if (!cfg)
        return pass(skb, STAT_UNCOUNTED);
    __u32 len = skb->len;

    // Link layer: Ethernet with up to two VLAN tags, or bare IP.
    __u32 l3 = 0;
    __u16 ethertype = 0;
    if (cfg->link == 0) {
        __u8 eth[4];
        if (bpf_skb_load_bytes(skb, 12, eth, 2))
            return pass(skb, STAT_UNCOUNTED);
        ethertype = be16(eth);
        l3 = 14;
#pragma clang loop unroll(full)
        for (int tag = 0; tag < 2; tag++) {
            if (ethertype == 0x8100 || ethertype == 0x88a8 || ethertype == 0x9100) {
                if (bpf_skb_load_bytes(skb, l3 + 2, eth, 2))
                    return pass(skb, STAT_UNCOUNTED);
                ethertype = be16(eth);
                l3 += 4;
            }
        }
        if (ethertype != 0x0800 && ethertype != 0x86dd)
            return pass(skb, STAT_UNCOUNTED);
    }

    struct flow_key k = {};
    __u32 src[4] = {}, dst[4] = {};
    __u8 ip[40];
    __u32 ip_len, l4, l4_len;
    __u8 proto;
    if (bpf_skb_load_bytes(skb, l3, ip, 20))
        return pass(skb, STAT_UNCOUNTED);
    __u8 version = ip[0] >> 4;
    if (cfg->link == 0 && version != (ethertype == 0x0800 ? 4 : 6))
        return pass(skb, STAT_UNCOUNTED);
    if (version == 4) {
        __u32 ihl = (ip[0] & 0x0f) * 4;
        ip_len = be16(ip + 2);
        // Options are fine; fragments, a zero (TSO) or short length are the pipeline's.
        if (ihl < 20 || ip_len == 0 || ip_len < ihl || (be16(ip + 6) & 0x3fff) != 0)
            return pass(skb, STAT_UNCOUNTED);
        proto = ip[9];
        src[2] = dst[2] = __builtin_bswap32(0x0000ffff);
        __builtin_memcpy(&src[3], ip + 12, 4);
        __builtin_memcpy(&dst[3], ip + 16, 4);
        l4 = l3 + ihl;
        l4_len = ip_len - ihl;
    } else if (version == 6) {
        if (bpf_skb_load_bytes(skb, l3, ip, 40))
            return pass(skb, STAT_UNCOUNTED);
        __u32 plen = be16(ip + 4);
        // Extension headers and jumbograms are the pipeline's.
        if (plen == 0)
            return pass(skb, STAT_UNCOUNTED);
        proto = ip[6];
        __builtin_memcpy(src, ip + 8, 16);
        __builtin_memcpy(dst, ip + 24, 16);
        ip_len = plen + 40;
        l4 = l3 + 40;
        l4_len = plen;
        k.v6 = 1;
    } else {
        return pass(skb, STAT_UNCOUNTED);
    }
    if (proto != 6 && proto != 17)
        return pass(skb, STAT_UNCOUNTED);

    // The IP bytes present in the frame (Ethernet padding is not payload).
    __u32 avail = len > l4 ? len - l4 : 0;
    if (avail > l4_len)
        avail = l4_len;
    __u8 th[14];
    __u8 tcp_flags = 0;
    if (proto == 6) {
        if (avail < 20 || bpf_skb_load_bytes(skb, l4, th, 14))
            return pass(skb, STAT_UNCOUNTED);
        __u32 doff = (th[12] >> 4) * 4;
        if (doff < 20 || doff > l4_len || avail < doff)
            return pass(skb, STAT_UNCOUNTED);
        tcp_flags = th[13];
    } else {
        if (l4_len < 8 || avail < 8 || bpf_skb_load_bytes(skb, l4, th, 4))
            return pass(skb, STAT_UNCOUNTED);
    }
    __u16 sport = be16(th), dport = be16(th + 2);

    int forward = !endpoint_less(dst, dport, src, sport);
    if (forward) {
        __builtin_memcpy(k.a, src, 16);
        __builtin_memcpy(k.b, dst, 16);
    } else {
        __builtin_memcpy(k.a, dst, 16);
        __builtin_memcpy(k.b, src, 16);
    }
    k.a_port = forward ? sport : dport;
    k.b_port = forward ? dport : sport;
    k.proto = proto;

    __u64 now = bpf_ktime_get_ns();
    struct flow_value *v = bpf_map_lookup_elem(&flows, &k);
    if (!v) {
        struct flow_value nv = {};
        nv.first_ns = now;
        nv.last_ns = now;
        nv.initiator_is_a = forward;
        // Another CPU may have created it meanwhile: then use that one.
        bpf_map_update_elem(&flows, &k, &nv, BPF_NOEXIST);
        v = bpf_map_lookup_elem(&flows, &k);
        if (!v)
            return pass(skb, STAT_NO_ENTRY);
    }
    __u32 d = forward ? 0 : 1;
    __u64 seen = v->packets[0] + v->packets[1];
    int deliver = seen < cfg->first_packets || (tcp_flags & cfg->tcp_flags) != 0 ||
                  sport == 53 || dport == 53 || sport == 5353 || dport == 5353 ||
                  (cfg->gap_ns != 0 && now - v->last_ns >= cfg->gap_ns) ||
                  (cfg->sample_every != 0 && seen % cfg->sample_every == 0);
    v->last_ns = now;
    __sync_fetch_and_add(&v->packets[d], 1);
    __sync_fetch_and_add(&v->bytes[d], ip_len);
    if (deliver)
        return pass(skb, STAT_DELIVERED);
    __sync_fetch_and_add(&v->skipped_packets[d], 1);
    __sync_fetch_and_add(&v->skipped_bytes[d], ip_len);
    stat(STAT_SKIPPED);
    return 0;
}

char _license[] SEC("license") = "Dual BSD/GPL";
