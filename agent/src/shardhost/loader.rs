//! Safe loading of shard libraries: the FFI boundary of the agent.
//!
//! A library is opened **once** with `O_NOFOLLOW`, checked on that descriptor
//! (regular file, owned by root or the agent's user, not writable by group or
//! others), hashed from that descriptor and compared with the SHA-256 the
//! signed instruction carries, and only then handed to `dlopen` as
//! `/proc/self/fd/N` — the same open file, so nothing can be swapped in
//! between check and load. A library that fails any check is never mapped, so
//! its ELF constructors never run.
//!
//! After `dlopen` the entry symbol `shardline_shard_entry_v1` is looked up and
//! the descriptor validated (ABI version first, then struct size, then
//! strings) before any shard function is called. [`LoadedShard`] wraps the
//! vtable in safe methods; it runs only inside a shard host process.
//!
//! This module and `sys` are the only places in `shardhost` with `unsafe`.
#![allow(unsafe_code)]

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shardline_shard_sdk::{
    status, HostApiV1, ShardDescriptorV1, ShardStatsV1, ShardVtableV1, StrRef, ABI_VERSION_V1,
    ENTRY_SYMBOL_V1,
};
use std::ffi::c_void;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why a library was refused. Nothing of it was run.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: not inside the shard directory {dir}")]
    OutsideShardDir { path: PathBuf, dir: PathBuf },
    #[error("shard directory {dir}: {source}")]
    ShardDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: is a symbolic link (refused, O_NOFOLLOW)")]
    Symlink { path: PathBuf },
    #[error("{path}: cannot open: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a regular file")]
    NotRegularFile { path: PathBuf },
    #[error("{path}: owned by uid {uid}; must be root or the agent's uid {agent_uid}")]
    BadOwner {
        path: PathBuf,
        uid: u32,
        agent_uid: u32,
    },
    #[error("{path}: writable by group or others (mode {mode:o})")]
    WritableByOthers { path: PathBuf, mode: u32 },
    #[error("{path}: SHA-256 is {actual}, the instruction says {expected}")]
    HashMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{path}: dlopen failed: {reason}")]
    Dlopen { path: PathBuf, reason: String },
    #[error("{path}: no entry symbol {symbol}")]
    MissingSymbol { path: PathBuf, symbol: &'static str },
    #[error("{path}: entry symbol returned a null descriptor")]
    NullDescriptor { path: PathBuf },
    #[error("{path}: built for shard ABI version {found}; this agent speaks {expected}")]
    AbiMismatch {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error("{path}: descriptor is {found} bytes, ABI v1 needs at least {min}")]
    DescriptorTooSmall { path: PathBuf, found: u32, min: u32 },
    #[error("{path}: descriptor field {field} is not a short UTF-8 string")]
    BadDescriptor { path: PathBuf, field: &'static str },
    #[error("{path}: library is {found}, the instruction expects {expected}")]
    IdentityMismatch {
        path: PathBuf,
        found: String,
        expected: String,
    },
}

/// What a library says about itself (its descriptor, copied out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub abi_version: u32,
    pub id: String,
    pub version: String,
    pub capability: String,
    pub service: String,
    /// `shardline_shard_sdk::kind` value.
    pub kind: u32,
    pub cost_cpu_permille: u32,
    pub cost_memory_bytes: u64,
}

/// A library file that passed the file checks; still open, not yet mapped.
#[derive(Debug)]
pub struct VerifiedFile {
    file: File,
    path: PathBuf,
    sha256: [u8; 32],
}

impl VerifiedFile {
    pub fn sha256(&self) -> [u8; 32] {
        self.sha256
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Opens `path` (which must name a file directly inside `shard_dir`) once,
/// checks ownership and mode on the descriptor, and hashes it. With
/// `expected` set, a different hash is refused.
pub fn open_verified(
    shard_dir: &Path,
    path: &Path,
    expected: Option<&[u8; 32]>,
    agent_uid: u32,
) -> Result<VerifiedFile, LoadError> {
    let dir = shard_dir
        .canonicalize()
        .map_err(|source| LoadError::ShardDir {
            dir: shard_dir.to_owned(),
            source,
        })?;
    let outside = || LoadError::OutsideShardDir {
        path: path.to_owned(),
        dir: dir.clone(),
    };
    let name = path.file_name().ok_or_else(outside)?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.canonicalize().map_err(|_| outside())?,
        _ => return Err(outside()),
    };
    if parent != dir || name == ".." || name == "." {
        return Err(outside());
    }
    let full = dir.join(name);
    let file = std::fs::OpenOptions::new()
        .read(true)
        // O_NONBLOCK: opening a FIFO (or a device) planted at a shard path must not
        // block the host until the agent declares it hung; fstat below refuses it.
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(&full)
        .map_err(|source| {
            if source.raw_os_error() == Some(libc::ELOOP) {
                LoadError::Symlink { path: full.clone() }
            } else {
                LoadError::Open {
                    path: full.clone(),
                    source,
                }
            }
        })?;
    // fstat on the descriptor we will load from, never on the path again.
    let meta = file.metadata().map_err(|source| LoadError::Open {
        path: full.clone(),
        source,
    })?;
    if !meta.file_type().is_file() {
        return Err(LoadError::NotRegularFile { path: full });
    }
    if meta.uid() != 0 && meta.uid() != agent_uid {
        return Err(LoadError::BadOwner {
            path: full,
            uid: meta.uid(),
            agent_uid,
        });
    }
    if meta.mode() & 0o022 != 0 {
        return Err(LoadError::WritableByOthers {
            path: full,
            mode: meta.mode() & 0o7777,
        });
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut reader = &file;
    loop {
        let n = reader.read(&mut buf).map_err(|source| LoadError::Open {
            path: full.clone(),
            source,
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let sha256: [u8; 32] = hasher.finalize().into();
    if let Some(expected) = expected {
        if &sha256 != expected {
            return Err(LoadError::HashMismatch {
                path: full,
                expected: hex::encode(expected),
                actual: hex::encode(sha256),
            });
        }
    }
    Ok(VerifiedFile {
        file,
        path: full,
        sha256,
    })
}

/// A mapped library with a validated descriptor. Dropping it destroys the
/// shard instance (if any) before unmapping the library.
#[derive(Debug)]
pub struct LoadedShard {
    info: ShardInfo,
    vtable: ShardVtableV1,
    handle: *mut c_void,
    path: PathBuf,
    // Declared last: dropped after `handle` is destroyed in `Drop`.
    _lib: libloading::os::unix::Library,
}

fn read_str(path: &Path, field: &'static str, s: StrRef) -> Result<String, LoadError> {
    const MAX: usize = 256;
    if s.ptr.is_null() || s.len > MAX {
        return Err(LoadError::BadDescriptor {
            path: path.to_owned(),
            field,
        });
    }
    // SAFETY: the descriptor is static data of the mapped library; `ptr` is non-null and the
    // library claims `len` (≤ 256) bytes there. A lying library can only crash this sacrificial
    // host process, which the agent survives by design.
    let bytes = unsafe { s.as_bytes() };
    String::from_utf8(bytes.to_vec()).map_err(|_| LoadError::BadDescriptor {
        path: path.to_owned(),
        field,
    })
}

/// Maps a verified file through its own descriptor and validates the descriptor.
pub fn load(verified: VerifiedFile) -> Result<LoadedShard, LoadError> {
    let path = verified.path.clone();
    let proc_path = format!("/proc/self/fd/{}", verified.file.as_raw_fd());
    // SAFETY: loading runs the library's constructors. That is the point of no return we
    // reach only after the ownership, mode and hash checks on this very descriptor passed;
    // we are in a sandboxed host process whose death the agent survives.
    let lib = unsafe {
        libloading::os::unix::Library::open(
            Some(&proc_path),
            libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL,
        )
    }
    .map_err(|e| LoadError::Dlopen {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    // The mapping holds its own reference to the file.
    drop(verified);
    // SAFETY: we declare the symbol with the ABI v1 entry signature; a library exporting this
    // name promises that signature (it is the contract of the symbol name).
    let entry: libloading::os::unix::Symbol<extern "C" fn() -> *const u8> =
        unsafe { lib.get(ENTRY_SYMBOL_V1.as_bytes()) }.map_err(|_| LoadError::MissingSymbol {
            path: path.clone(),
            symbol: ENTRY_SYMBOL_V1,
        })?;
    let desc = entry();
    if desc.is_null() {
        return Err(LoadError::NullDescriptor { path });
    }
    // Every ABI version starts with (abi_version: u32, struct_size: u32); read only those
    // before knowing which layout the rest has.
    // SAFETY: non-null pointer to the library's static descriptor; two u32 reads at offsets
    // 0 and 4, unaligned-tolerant.
    let (abi, size) = unsafe {
        (
            std::ptr::read_unaligned(desc as *const u32),
            std::ptr::read_unaligned(desc.add(4) as *const u32),
        )
    };
    if abi != ABI_VERSION_V1 {
        return Err(LoadError::AbiMismatch {
            path,
            found: abi,
            expected: ABI_VERSION_V1,
        });
    }
    let min = std::mem::size_of::<ShardDescriptorV1>() as u32;
    if size < min {
        return Err(LoadError::DescriptorTooSmall {
            path,
            found: size,
            min,
        });
    }
    // SAFETY: the library declares ABI v1 and at least the v1 size, so the pointer addresses a
    // ShardDescriptorV1 (later versions only append). We copy the fields we need.
    let d = unsafe { &*(desc as *const ShardDescriptorV1) };
    if d.vtable.is_null() {
        return Err(LoadError::BadDescriptor {
            path,
            field: "vtable",
        });
    }
    // SAFETY: non-null pointer to the library's static vtable of function pointers; copied.
    let vtable = unsafe { *d.vtable };
    let info = ShardInfo {
        abi_version: abi,
        id: read_str(&path, "id", d.id)?,
        version: read_str(&path, "version", d.version)?,
        capability: read_str(&path, "capability", d.capability)?,
        service: read_str(&path, "service", d.service)?,
        kind: d.kind,
        cost_cpu_permille: d.cost.cpu_permille,
        cost_memory_bytes: d.cost.memory_bytes,
    };
    Ok(LoadedShard {
        info,
        vtable,
        handle: std::ptr::null_mut(),
        path,
        _lib: lib,
    })
}

impl LoadedShard {
    pub fn info(&self) -> &ShardInfo {
        &self.info
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_initialised(&self) -> bool {
        !self.handle.is_null()
    }

    /// Calls the shard's `init`. The shard keeps a copy of `host` and calls
    /// through its context pointer until it is destroyed, so the caller keeps
    /// `host` and the services it points at alive (and unmoved) until this
    /// shard is dropped — `host::run` boxes both and drops the shards first.
    pub fn init(&mut self, host: &HostApiV1, config: &[u8]) -> i32 {
        if self.is_initialised() {
            return status::INVALID;
        }
        let mut handle = std::ptr::null_mut();
        // SAFETY: valid config slice and out pointer for the call; `host` validity is this
        // method's documented contract.
        let rc = unsafe { (self.vtable.init)(host, config.as_ptr(), config.len(), &mut handle) };
        if rc >= 0 {
            if handle.is_null() {
                return status::INVALID;
            }
            self.handle = handle;
        }
        rc
    }

    /// Polls the shard; returns the status and the next wake-up it asked for.
    pub fn poll(&mut self, now_ms: u64) -> (i32, u64) {
        if !self.is_initialised() {
            return (status::NOT_READY, u64::MAX);
        }
        let mut next = u64::MAX;
        // SAFETY: handle from a successful init; `next` is a valid out pointer.
        let rc = unsafe { (self.vtable.poll)(self.handle, now_ms, &mut next) };
        (rc, next)
    }

    /// Appends the descriptors the shard waits on to `out`.
    pub fn fds(&mut self, out: &mut Vec<i32>) -> i32 {
        if !self.is_initialised() {
            return status::NOT_READY;
        }
        let mut buf = [0i32; 16];
        let mut n = 0usize;
        // SAFETY: handle from init; `buf` has 16 writable slots, `n` is a valid out pointer.
        let rc = unsafe { (self.vtable.fds)(self.handle, buf.as_mut_ptr(), buf.len(), &mut n) };
        if rc >= 0 {
            out.extend_from_slice(&buf[..n.min(buf.len())]);
        }
        rc
    }

    /// Calls one service method; writes into `out`, returns (status, length).
    pub fn call(&mut self, method: u32, input: &[u8], out: &mut [u8]) -> (i32, usize) {
        if !self.is_initialised() {
            return (status::NOT_READY, 0);
        }
        let mut n = 0usize;
        // SAFETY: handle from init; input and output slices valid for the call.
        let rc = unsafe {
            (self.vtable.call)(
                self.handle,
                method,
                input.as_ptr(),
                input.len(),
                out.as_mut_ptr(),
                out.len(),
                &mut n,
            )
        };
        (rc, n)
    }

    pub fn stats(&mut self) -> Option<ShardStatsV1> {
        if !self.is_initialised() {
            return None;
        }
        let mut st = ShardStatsV1::default();
        // SAFETY: handle from init; `st` is a valid out pointer.
        let rc = unsafe { (self.vtable.stats)(self.handle, &mut st) };
        (rc >= 0).then_some(st)
    }
}

impl Drop for LoadedShard {
    fn drop(&mut self) {
        if !self.handle.is_null() {
            // SAFETY: handle from init, destroyed exactly once, before the library unmaps.
            unsafe { (self.vtable.destroy)(self.handle) };
            self.handle = std::ptr::null_mut();
        }
    }
}

/// What the host offers shards through [`HostApiV1`]; implemented by the host loop.
pub trait HostServices {
    fn log(&self, level: u32, msg: &str);
    fn metric(&self, name: &str, value: i64);
    /// Calls `method` of the shard providing `service`; writes into `out`,
    /// returns (status, length written or needed).
    fn call_service(
        &self,
        service: &str,
        method: u32,
        input: &[u8],
        out: &mut [u8],
    ) -> (i32, usize);
}

unsafe extern "C" fn tramp_log<H: HostServices>(
    ctx: *mut c_void,
    level: u32,
    msg: *const u8,
    len: usize,
) {
    if ctx.is_null() || msg.is_null() {
        return;
    }
    // SAFETY: ctx is the &H the host registered in `host_api` (valid while shards live);
    // msg/len is a slice the shard passes for the duration of the call.
    let (h, bytes) = unsafe { (&*(ctx as *const H), std::slice::from_raw_parts(msg, len)) };
    h.log(level, &String::from_utf8_lossy(bytes));
}

unsafe extern "C" fn tramp_metric<H: HostServices>(
    ctx: *mut c_void,
    name: *const u8,
    len: usize,
    value: i64,
) {
    if ctx.is_null() || name.is_null() {
        return;
    }
    // SAFETY: as in tramp_log.
    let (h, bytes) = unsafe { (&*(ctx as *const H), std::slice::from_raw_parts(name, len)) };
    h.metric(&String::from_utf8_lossy(bytes), value);
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn tramp_call<H: HostServices>(
    ctx: *mut c_void,
    service: *const u8,
    service_len: usize,
    method: u32,
    input: *const u8,
    input_len: usize,
    out: *mut u8,
    out_cap: usize,
    out_len: *mut usize,
) -> i32 {
    if ctx.is_null() || service.is_null() || out_len.is_null() {
        return status::INVALID;
    }
    // SAFETY: ctx as in tramp_log; the service name slice is valid for the call.
    let (h, name) = unsafe {
        (
            &*(ctx as *const H),
            std::slice::from_raw_parts(service, service_len),
        )
    };
    let Ok(name) = std::str::from_utf8(name) else {
        return status::INVALID;
    };
    if (input.is_null() && input_len > 0) || (out.is_null() && out_cap > 0) {
        return status::INVALID;
    }
    let input: &[u8] = if input_len == 0 {
        &[]
    } else {
        // SAFETY: the calling shard passes `input_len` readable bytes valid for this call.
        unsafe { std::slice::from_raw_parts(input, input_len) }
    };
    let out: &mut [u8] = if out_cap == 0 {
        &mut []
    } else {
        // SAFETY: the calling shard passes `out_cap` writable bytes, not overlapping `input`
        // (the SDK's Host::call_service passes its own Vec's spare capacity).
        unsafe { std::slice::from_raw_parts_mut(out, out_cap) }
    };
    let (rc, n) = h.call_service(name, method, input, out);
    // SAFETY: out_len was checked non-null and is writable per the ABI contract.
    unsafe { *out_len = n };
    rc
}

/// Builds the host API table pointing at `services`. The table and `services`
/// must outlive every shard initialised with it.
pub fn host_api<H: HostServices>(services: &H) -> HostApiV1 {
    HostApiV1 {
        struct_size: std::mem::size_of::<HostApiV1>() as u32,
        ctx: services as *const H as *mut c_void,
        log: tramp_log::<H>,
        metric: tramp_metric::<H>,
        call_service: tramp_call::<H>,
    }
}
