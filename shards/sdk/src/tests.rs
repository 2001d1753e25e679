//! Calls an exported test shard through its descriptor, as a host would.

use super::*;
use std::ptr;

struct Echo {
    host: Host,
    polls: u64,
}

impl Shard for Echo {
    fn init(host: Host, config: &[u8]) -> Result<Self, ShardError> {
        let kv = config::KeyValues::parse(config)?;
        if kv.get("fail").is_some() {
            return Err(ShardError::invalid("asked to fail"));
        }
        Ok(Self { host, polls: 0 })
    }
    fn poll(&mut self, now_ms: u64) -> Result<u64, ShardError> {
        self.polls += 1;
        self.host.metric("polls", self.polls as i64);
        Ok(now_ms + 10)
    }
    fn call(&mut self, method: u32, input: &[u8], out: &mut Vec<u8>) -> Result<(), ShardError> {
        match method {
            1 => {
                out.extend_from_slice(input);
                Ok(())
            }
            2 => panic!("boom"),
            _ => Err(ShardError::new(status::NO_SUCH_SERVICE, "no method")),
        }
    }
    fn stats(&self) -> ShardStatsV1 {
        ShardStatsV1 {
            packets_in: self.polls,
            ..Default::default()
        }
    }
}

export_shard! {
    shard: Echo,
    id: "echo",
    version: "0.0.1",
    capability: "test",
    service: "echo",
    kind: kind::COMPUTE,
    cost: ResourceCostV1 { cpu_permille: 1, memory_bytes: 1024 },
}

unsafe extern "C" fn log(_: *mut c_void, _: u32, _: *const u8, _: usize) {}
unsafe extern "C" fn metric(_: *mut c_void, _: *const u8, _: usize, _: i64) {}
unsafe extern "C" fn call_service(
    _: *mut c_void,
    _: *const u8,
    _: usize,
    _: u32,
    _: *const u8,
    _: usize,
    _: *mut u8,
    _: usize,
    _: *mut usize,
) -> i32 {
    status::NO_SUCH_SERVICE
}

fn host_api() -> HostApiV1 {
    HostApiV1 {
        struct_size: std::mem::size_of::<HostApiV1>() as u32,
        ctx: ptr::null_mut(),
        log,
        metric,
        call_service,
    }
}

#[test]
fn descriptor_and_vtable_round_trip_and_panics_are_caught() {
    let desc = __shardline_export::shardline_shard_entry_v1();
    // SAFETY: the entry returns a pointer to a static descriptor.
    let desc = unsafe { &*desc };
    assert_eq!(desc.abi_version, ABI_VERSION_V1);
    assert_eq!(
        desc.struct_size as usize,
        std::mem::size_of::<ShardDescriptorV1>()
    );
    // SAFETY: descriptor strings are static.
    assert_eq!(unsafe { desc.id.as_bytes() }, b"echo");
    // SAFETY: the vtable pointer is a static.
    let vt = unsafe { &*desc.vtable };
    let api = host_api();
    let mut handle = ptr::null_mut();
    let cfg = b"fail = yes";
    // SAFETY: valid pointers for the duration of each call; handle from init.
    unsafe {
        assert_eq!(
            (vt.init)(&api, cfg.as_ptr(), cfg.len(), &mut handle),
            status::INVALID
        );
        assert!(handle.is_null());
        assert_eq!((vt.init)(&api, ptr::null(), 0, &mut handle), status::OK);
        let mut next = 0u64;
        assert_eq!((vt.poll)(handle, 5, &mut next), status::OK);
        assert_eq!(next, 15);
        let input = b"hello";
        let mut out = [0u8; 3];
        let mut len = 0usize;
        let rc = (vt.call)(
            handle,
            1,
            input.as_ptr(),
            input.len(),
            out.as_mut_ptr(),
            out.len(),
            &mut len,
        );
        assert_eq!((rc, len), (status::BUFFER_TOO_SMALL, 5));
        let mut out = [0u8; 8];
        let rc = (vt.call)(
            handle,
            1,
            input.as_ptr(),
            input.len(),
            out.as_mut_ptr(),
            out.len(),
            &mut len,
        );
        assert_eq!((rc, &out[..len]), (status::OK, &input[..]));
        let rc = (vt.call)(
            handle,
            2,
            input.as_ptr(),
            0,
            out.as_mut_ptr(),
            out.len(),
            &mut len,
        );
        assert_eq!(rc, status::PANICKED);
        let mut st = ShardStatsV1::default();
        assert_eq!((vt.stats)(handle, &mut st), status::OK);
        assert_eq!(st.packets_in, 1);
        (vt.destroy)(handle);
    }
}

#[test]
fn key_values_parse_and_report_bad_lines() {
    let kv = config::KeyValues::parse(b"# c\nrate = 100\nname = \"x y\"\n").unwrap();
    assert_eq!(kv.require::<u32>("rate").unwrap(), 100);
    assert_eq!(kv.get("name"), Some("x y"));
    assert!(kv.require::<u32>("name").is_err());
    assert!(config::KeyValues::parse(b"novalue").is_err());
    assert_eq!(config::decode_hex("0aFF").unwrap(), vec![10, 255]);
}
