//! The Shardline shard plugin ABI, version 1, and the [`export_shard!`] macro.
//!
//! A shard is a `cdylib` that exports exactly one entry symbol per ABI
//! version it speaks ([`ENTRY_SYMBOL_V1`] = `shardline_shard_entry_v1`). The
//! symbol returns a pointer to a static [`ShardDescriptorV1`]: ABI version,
//! the struct's size (so later versions can append fields), id, version,
//! capability, the service the shard provides, kind, declared resource cost
//! and a [`ShardVtableV1`].
//!
//! Only C types, `(ptr, len)` byte slices, opaque handles and `i32` status
//! codes cross the boundary. The host hands the shard a [`HostApiV1`] vtable
//! going the other way: logging, metrics, and calling a service of another
//! shard loaded in the same host (the tunnel asks the `aead` service to seal
//! and open).
//!
//! Shard authors implement the safe [`Shard`] trait and call
//! [`export_shard!`]; the macro writes the exports and wraps every one in
//! `catch_unwind`, so a panic becomes [`status::PANICKED`] instead of
//! unwinding into the host.
//!
//! Threading contract: the host calls into one shard from one thread at a
//! time (its event loop), including calls that arrive through
//! [`HostApiV1::call_service`]. A shard must not block in `poll`; it returns
//! the file descriptors it waits on through `fds` and the host sleeps in
//! `poll(2)` on them.
//!
//! This crate has no dependencies beyond `core`/`std`, so a shard never links
//! the agent.
#![allow(unsafe_code)] // This crate *is* the FFI boundary; every block says why it is sound.

use std::ffi::c_void;
use std::os::raw::c_char;

pub mod config;
pub mod services;

/// The ABI version this SDK speaks.
pub const ABI_VERSION_V1: u32 = 1;
/// Name of the entry symbol for ABI version 1.
pub const ENTRY_SYMBOL_V1: &str = "shardline_shard_entry_v1";

/// Status codes returned across the boundary. Non-negative is success.
pub mod status {
    pub const OK: i32 = 0;
    /// Generic failure reported by the shard.
    pub const ERROR: i32 = -1;
    /// The shard panicked; the panic was caught at the boundary.
    pub const PANICKED: i32 = -2;
    /// Arguments were invalid (null pointer, bad length, bad config).
    pub const INVALID: i32 = -3;
    /// The output buffer is too small; `out_len` holds the size needed.
    pub const BUFFER_TOO_SMALL: i32 = -4;
    /// The requested service or method does not exist.
    pub const NO_SUCH_SERVICE: i32 = -5;
    /// The shard is not ready for this call yet (e.g. no session keys).
    pub const NOT_READY: i32 = -6;
    /// Authentication of a message failed (bad tag, replay).
    pub const AUTH_FAILED: i32 = -7;
    /// The callee is already executing (re-entrant call refused).
    pub const BUSY: i32 = -8;
}

/// What a shard spends: compute or carries data (mirrors the wire `ShardKind`).
pub mod kind {
    pub const COMPUTE: u32 = 0;
    pub const DATA: u32 = 1;
}

/// Log levels for [`HostApiV1::log`].
pub mod level {
    pub const ERROR: u32 = 1;
    pub const WARN: u32 = 2;
    pub const INFO: u32 = 3;
    pub const DEBUG: u32 = 4;
}

/// A borrowed UTF-8 string: pointer and length, no terminator needed.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct StrRef {
    pub ptr: *const c_char,
    pub len: usize,
}

impl StrRef {
    /// A `StrRef` to a `'static` string (what descriptors hold).
    pub const fn from_static(s: &'static str) -> Self {
        Self {
            ptr: s.as_ptr() as *const c_char,
            len: s.len(),
        }
    }

    /// Reads the bytes behind a `StrRef`.
    ///
    /// # Safety
    /// `ptr` must point to `len` readable bytes that stay valid for `'a`.
    pub unsafe fn as_bytes<'a>(&self) -> &'a [u8] {
        if self.ptr.is_null() || self.len == 0 {
            return &[];
        }
        // SAFETY: the caller guarantees `ptr` addresses `len` readable bytes living for 'a.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

/// The resource cost a shard declares (what it needs to do its job).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceCostV1 {
    /// CPU it needs at its declared load, per mille of one core.
    pub cpu_permille: u32,
    /// Memory it needs, bytes.
    pub memory_bytes: u64,
}

/// Counters a shard reports through `stats`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardStatsV1 {
    pub packets_in: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub dropped: u64,
    pub errors: u64,
}

/// The functions a shard exports, all `extern "C"`, all catching panics.
///
/// `handle` is the opaque pointer `init` wrote; the host never dereferences it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ShardVtableV1 {
    /// Creates the shard from its configuration bytes. On success writes an
    /// opaque handle to `out_handle` and returns [`status::OK`].
    pub init: unsafe extern "C" fn(
        host: *const HostApiV1,
        config: *const u8,
        config_len: usize,
        out_handle: *mut *mut c_void,
    ) -> i32,
    /// Does the work that is ready now without blocking; writes the latest
    /// time (ms, same clock as `now_ms`) it wants to be polled again.
    pub poll: unsafe extern "C" fn(handle: *mut c_void, now_ms: u64, out_next_ms: *mut u64) -> i32,
    /// Writes up to `cap` file descriptors the shard waits on (readable)
    /// into `out`, the count into `out_len`.
    pub fds: unsafe extern "C" fn(
        handle: *mut c_void,
        out: *mut i32,
        cap: usize,
        out_len: *mut usize,
    ) -> i32,
    /// Calls one method of the service the shard provides: input bytes in,
    /// output bytes into `(out, out_cap)`, the length written into `out_len`.
    pub call: unsafe extern "C" fn(
        handle: *mut c_void,
        method: u32,
        input: *const u8,
        input_len: usize,
        out: *mut u8,
        out_cap: usize,
        out_len: *mut usize,
    ) -> i32,
    /// Writes the shard's counters.
    pub stats: unsafe extern "C" fn(handle: *mut c_void, out: *mut ShardStatsV1) -> i32,
    /// Destroys the shard; the handle is invalid afterwards.
    pub destroy: unsafe extern "C" fn(handle: *mut c_void),
}

/// What the entry symbol returns. Fields are only ever appended; a host
/// reads `struct_size` before touching anything past `abi_version`.
#[repr(C)]
#[derive(Debug)]
pub struct ShardDescriptorV1 {
    pub abi_version: u32,
    pub struct_size: u32,
    pub id: StrRef,
    pub version: StrRef,
    pub capability: StrRef,
    /// Name of the service other shards reach it by (`aead`, `auth`, `mark`…).
    pub service: StrRef,
    /// [`kind::COMPUTE`] or [`kind::DATA`].
    pub kind: u32,
    pub cost: ResourceCostV1,
    pub vtable: *const ShardVtableV1,
}

// SAFETY: a descriptor is immutable static data: string literals and a pointer
// to a static vtable of function pointers; sharing it between threads is sound.
unsafe impl Sync for ShardDescriptorV1 {}

/// The host's functions, handed to `init`. Valid until `destroy` returns.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct HostApiV1 {
    pub struct_size: u32,
    /// Opaque host context, passed back on every call.
    pub ctx: *mut c_void,
    pub log: unsafe extern "C" fn(ctx: *mut c_void, level: u32, msg: *const u8, len: usize),
    pub metric:
        unsafe extern "C" fn(ctx: *mut c_void, name: *const u8, name_len: usize, value: i64),
    /// Calls `method` of the shard providing `service` in the same host.
    pub call_service: unsafe extern "C" fn(
        ctx: *mut c_void,
        service: *const u8,
        service_len: usize,
        method: u32,
        input: *const u8,
        input_len: usize,
        out: *mut u8,
        out_cap: usize,
        out_len: *mut usize,
    ) -> i32,
}

/// A safe handle on the host API for shard code.
#[derive(Debug, Clone, Copy)]
pub struct Host {
    api: HostApiV1,
}

// SAFETY: the host promises its API functions may be called from the thread
// that calls into the shard; the context pointer is never dereferenced here.
unsafe impl Send for Host {}

impl Host {
    /// Wraps the pointer `init` received.
    ///
    /// # Safety
    /// `api` must be null or point to a valid [`HostApiV1`].
    pub unsafe fn from_raw(api: *const HostApiV1) -> Option<Self> {
        if api.is_null() {
            return None;
        }
        // SAFETY: non-null and valid per the caller's contract; we copy it out.
        let api = unsafe { *api };
        if (api.struct_size as usize) < std::mem::size_of::<HostApiV1>() {
            return None;
        }
        Some(Self { api })
    }

    pub fn log(&self, level: u32, msg: &str) {
        // SAFETY: `msg` is a valid slice for the duration of the call; ctx is the host's.
        unsafe { (self.api.log)(self.api.ctx, level, msg.as_ptr(), msg.len()) }
    }

    pub fn metric(&self, name: &str, value: i64) {
        // SAFETY: `name` is a valid slice for the duration of the call.
        unsafe { (self.api.metric)(self.api.ctx, name.as_ptr(), name.len(), value) }
    }

    /// Calls another shard's service. Output is written into `out` (cleared
    /// first), which gets room for `input.len() + CALL_HEADROOM` bytes (or its
    /// capacity, if larger). A call is never retried, because it may have
    /// side effects (a handshake nonce recorded, a counter used): an output
    /// that does not fit fails with [`status::BUFFER_TOO_SMALL`].
    pub fn call_service(
        &self,
        service: &str,
        method: u32,
        input: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), i32> {
        out.clear();
        out.reserve(input.len() + CALL_HEADROOM);
        let mut written = 0usize;
        // SAFETY: all slices are valid for the call; `out` has `out.capacity()` writable bytes,
        // and the host writes at most that many.
        let rc = unsafe {
            (self.api.call_service)(
                self.api.ctx,
                service.as_ptr(),
                service.len(),
                method,
                input.as_ptr(),
                input.len(),
                out.as_mut_ptr(),
                out.capacity(),
                &mut written,
            )
        };
        if rc < 0 {
            return Err(rc);
        }
        if written > out.capacity() {
            return Err(status::INVALID);
        }
        // SAFETY: the callee initialised `written <= capacity` bytes.
        unsafe { out.set_len(written) };
        Ok(())
    }
}

/// Output room [`Host::call_service`] guarantees beyond the input length.
pub const CALL_HEADROOM: usize = 1024;

/// What a shard reports on failure: a status code (negative) and a reason
/// that is logged through the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardError {
    pub status: i32,
    pub reason: String,
}

impl ShardError {
    pub fn new(status: i32, reason: impl Into<String>) -> Self {
        Self {
            status: if status >= 0 { status::ERROR } else { status },
            reason: reason.into(),
        }
    }

    pub fn invalid(reason: impl Into<String>) -> Self {
        Self::new(status::INVALID, reason)
    }
}

impl std::fmt::Display for ShardError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (status {})", self.reason, self.status)
    }
}

/// The safe trait a shard implements; [`export_shard!`] adapts it to the ABI.
pub trait Shard: Sized + 'static {
    /// Builds the shard from its configuration bytes.
    fn init(host: Host, config: &[u8]) -> Result<Self, ShardError>;
    /// Does ready work without blocking; returns when it wants to be polled
    /// again at the latest (ms on the same clock as `now_ms`).
    fn poll(&mut self, _now_ms: u64) -> Result<u64, ShardError> {
        Ok(u64::MAX)
    }
    /// Descriptors to wait on for readability.
    fn fds(&self) -> Vec<i32> {
        Vec::new()
    }
    /// One method of the shard's service.
    fn call(&mut self, _method: u32, _input: &[u8], _out: &mut Vec<u8>) -> Result<(), ShardError> {
        Err(ShardError::new(
            status::NO_SUCH_SERVICE,
            "this shard provides no service",
        ))
    }
    fn stats(&self) -> ShardStatsV1 {
        ShardStatsV1::default()
    }
}

/// Adapter functions the macro instantiates. Not part of the stable API.
#[doc(hidden)]
pub mod __rt {
    use super::*;
    use std::panic::{catch_unwind, AssertUnwindSafe};

    /// The shard instance plus the host handle it logs failures through.
    #[allow(missing_debug_implementations)]
    pub struct Instance<S> {
        shard: S,
        host: Host,
        scratch: Vec<u8>,
    }

    fn report(host: &Host, what: &str, err: &ShardError) -> i32 {
        host.log(level::WARN, &format!("{what}: {err}"));
        err.status
    }

    /// # Safety
    /// Called by the host per the ABI contract of [`ShardVtableV1::init`].
    pub unsafe fn init<S: Shard>(
        host: *const HostApiV1,
        config: *const u8,
        config_len: usize,
        out_handle: *mut *mut c_void,
    ) -> i32 {
        catch_unwind(AssertUnwindSafe(|| {
            if out_handle.is_null() {
                return status::INVALID;
            }
            // SAFETY: the host passes a valid API pointer or null.
            let Some(host) = (unsafe { Host::from_raw(host) }) else {
                return status::INVALID;
            };
            let config: &[u8] = if config.is_null() || config_len == 0 {
                &[]
            } else {
                // SAFETY: the host passes `config_len` readable bytes valid for this call.
                unsafe { std::slice::from_raw_parts(config, config_len) }
            };
            match S::init(host, config) {
                Ok(shard) => {
                    let inst = Box::new(Instance {
                        shard,
                        host,
                        scratch: Vec::new(),
                    });
                    // SAFETY: `out_handle` is non-null and writable per the contract.
                    unsafe { *out_handle = Box::into_raw(inst) as *mut c_void };
                    status::OK
                }
                Err(e) => report(&host, "init failed", &e),
            }
        }))
        .unwrap_or(status::PANICKED)
    }

    /// # Safety
    /// `handle` must be a live handle from [`init`] for the same `S`.
    unsafe fn instance<'a, S>(handle: *mut c_void) -> Option<&'a mut Instance<S>> {
        // SAFETY: per the caller's contract, a non-null handle is a live Box<Instance<S>>
        // and the host serialises calls into one shard, so the &mut is unique.
        unsafe { (handle as *mut Instance<S>).as_mut() }
    }

    /// # Safety
    /// See [`ShardVtableV1::poll`].
    pub unsafe fn poll<S: Shard>(handle: *mut c_void, now_ms: u64, out_next_ms: *mut u64) -> i32 {
        catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: handle comes from init per the ABI contract.
            let Some(inst) = (unsafe { instance::<S>(handle) }) else {
                return status::INVALID;
            };
            match inst.shard.poll(now_ms) {
                Ok(next) => {
                    if !out_next_ms.is_null() {
                        // SAFETY: non-null out pointer provided by the host.
                        unsafe { *out_next_ms = next };
                    }
                    status::OK
                }
                Err(e) => report(&inst.host, "poll failed", &e),
            }
        }))
        .unwrap_or(status::PANICKED)
    }

    /// # Safety
    /// See [`ShardVtableV1::fds`].
    pub unsafe fn fds<S: Shard>(
        handle: *mut c_void,
        out: *mut i32,
        cap: usize,
        out_len: *mut usize,
    ) -> i32 {
        catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: handle comes from init per the ABI contract.
            let Some(inst) = (unsafe { instance::<S>(handle) }) else {
                return status::INVALID;
            };
            if out_len.is_null() || (out.is_null() && cap > 0) {
                return status::INVALID;
            }
            let fds = inst.shard.fds();
            // SAFETY: out_len is non-null and writable.
            unsafe { *out_len = fds.len() };
            if fds.len() > cap {
                return status::BUFFER_TOO_SMALL;
            }
            for (i, fd) in fds.iter().enumerate() {
                // SAFETY: i < fds.len() <= cap and `out` has `cap` writable slots.
                unsafe { *out.add(i) = *fd };
            }
            status::OK
        }))
        .unwrap_or(status::PANICKED)
    }

    /// # Safety
    /// See [`ShardVtableV1::call`].
    pub unsafe fn call<S: Shard>(
        handle: *mut c_void,
        method: u32,
        input: *const u8,
        input_len: usize,
        out: *mut u8,
        out_cap: usize,
        out_len: *mut usize,
    ) -> i32 {
        catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: handle comes from init per the ABI contract.
            let Some(inst) = (unsafe { instance::<S>(handle) }) else {
                return status::INVALID;
            };
            if out_len.is_null() || (out.is_null() && out_cap > 0) {
                return status::INVALID;
            }
            let input: &[u8] = if input.is_null() || input_len == 0 {
                &[]
            } else {
                // SAFETY: the caller passes `input_len` readable bytes valid for the call.
                unsafe { std::slice::from_raw_parts(input, input_len) }
            };
            let mut scratch = std::mem::take(&mut inst.scratch);
            scratch.clear();
            let rc = match inst.shard.call(method, input, &mut scratch) {
                Ok(()) => {
                    // SAFETY: out_len is non-null and writable.
                    unsafe { *out_len = scratch.len() };
                    if scratch.len() > out_cap {
                        status::BUFFER_TOO_SMALL
                    } else {
                        // SAFETY: `out` has `out_cap >= scratch.len()` writable bytes that do not
                        // overlap our own scratch buffer.
                        unsafe {
                            std::ptr::copy_nonoverlapping(scratch.as_ptr(), out, scratch.len())
                        };
                        status::OK
                    }
                }
                Err(e) => {
                    // SAFETY: out_len is non-null and writable.
                    unsafe { *out_len = 0 };
                    e.status
                }
            };
            inst.scratch = scratch;
            rc
        }))
        .unwrap_or(status::PANICKED)
    }

    /// # Safety
    /// See [`ShardVtableV1::stats`].
    pub unsafe fn stats<S: Shard>(handle: *mut c_void, out: *mut ShardStatsV1) -> i32 {
        catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: handle comes from init per the ABI contract.
            let Some(inst) = (unsafe { instance::<S>(handle) }) else {
                return status::INVALID;
            };
            if out.is_null() {
                return status::INVALID;
            }
            // SAFETY: non-null out pointer to a ShardStatsV1 provided by the host.
            unsafe { *out = inst.shard.stats() };
            status::OK
        }))
        .unwrap_or(status::PANICKED)
    }

    /// # Safety
    /// See [`ShardVtableV1::destroy`].
    pub unsafe fn destroy<S: Shard>(handle: *mut c_void) {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            if !handle.is_null() {
                // SAFETY: the handle is the Box::into_raw from init and is destroyed once.
                drop(unsafe { Box::from_raw(handle as *mut Instance<S>) });
            }
        }));
    }
}

/// Writes the ABI exports for a type implementing [`Shard`].
///
/// ```text
/// shardline_shard_sdk::export_shard! {
///     shard: MyShard,
///     id: "crypto-chacha20poly1305",
///     version: "0.1.0",
///     capability: "vpn",
///     service: "aead",
///     kind: shardline_shard_sdk::kind::COMPUTE,
///     cost: shardline_shard_sdk::ResourceCostV1 { cpu_permille: 200, memory_bytes: 4 << 20 },
/// }
/// ```
#[macro_export]
macro_rules! export_shard {
    (
        shard: $ty:ty,
        id: $id:expr,
        version: $version:expr,
        capability: $cap:expr,
        service: $service:expr,
        kind: $kind:expr,
        cost: $cost:expr $(,)?
    ) => {
        mod __shardline_export {
            use super::*;
            use ::std::ffi::c_void;
            use $crate::{HostApiV1, ShardDescriptorV1, ShardStatsV1, ShardVtableV1, StrRef};

            unsafe extern "C" fn init(
                host: *const HostApiV1,
                config: *const u8,
                config_len: usize,
                out_handle: *mut *mut c_void,
            ) -> i32 {
                // SAFETY: forwarded unchanged; the host upholds the ABI contract.
                unsafe { $crate::__rt::init::<$ty>(host, config, config_len, out_handle) }
            }
            unsafe extern "C" fn poll(
                handle: *mut c_void,
                now_ms: u64,
                out_next_ms: *mut u64,
            ) -> i32 {
                // SAFETY: forwarded unchanged; the host upholds the ABI contract.
                unsafe { $crate::__rt::poll::<$ty>(handle, now_ms, out_next_ms) }
            }
            unsafe extern "C" fn fds(
                handle: *mut c_void,
                out: *mut i32,
                cap: usize,
                out_len: *mut usize,
            ) -> i32 {
                // SAFETY: forwarded unchanged; the host upholds the ABI contract.
                unsafe { $crate::__rt::fds::<$ty>(handle, out, cap, out_len) }
            }
            unsafe extern "C" fn call(
                handle: *mut c_void,
                method: u32,
                input: *const u8,
                input_len: usize,
                out: *mut u8,
                out_cap: usize,
                out_len: *mut usize,
            ) -> i32 {
                // SAFETY: forwarded unchanged; the host upholds the ABI contract.
                unsafe {
                    $crate::__rt::call::<$ty>(
                        handle, method, input, input_len, out, out_cap, out_len,
                    )
                }
            }
            unsafe extern "C" fn stats(handle: *mut c_void, out: *mut ShardStatsV1) -> i32 {
                // SAFETY: forwarded unchanged; the host upholds the ABI contract.
                unsafe { $crate::__rt::stats::<$ty>(handle, out) }
            }
            unsafe extern "C" fn destroy(handle: *mut c_void) {
                // SAFETY: forwarded unchanged; the host upholds the ABI contract.
                unsafe { $crate::__rt::destroy::<$ty>(handle) }
            }

            static VTABLE: ShardVtableV1 = ShardVtableV1 {
                init,
                poll,
                fds,
                call,
                stats,
                destroy,
            };
            static DESCRIPTOR: ShardDescriptorV1 = ShardDescriptorV1 {
                abi_version: $crate::ABI_VERSION_V1,
                struct_size: ::std::mem::size_of::<ShardDescriptorV1>() as u32,
                id: StrRef::from_static($id),
                version: StrRef::from_static($version),
                capability: StrRef::from_static($cap),
                service: StrRef::from_static($service),
                kind: $kind,
                cost: $cost,
                vtable: &VTABLE,
            };

            /// The ABI v1 entry point. Returns static data only, so it cannot panic.
            #[allow(unsafe_code)] // `no_mangle` is how the host finds the entry symbol.
            #[no_mangle]
            pub extern "C" fn shardline_shard_entry_v1() -> *const ShardDescriptorV1 {
                &DESCRIPTOR
            }
        }
    };
}

#[cfg(test)]
mod tests;
