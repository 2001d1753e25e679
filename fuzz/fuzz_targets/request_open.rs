//! Fuzz target: untrusted bytes from the `request` topic (allocator side)
//! and the `answer` topic (agent side), opened as an explicit request and as
//! a request answer.
//!
//! Besides "never panics": whatever opens carries a valid signature by the
//! expected key under its own domain, names the expected device, and
//! re-encodes to a value that decodes back unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardline_shared::request::{self, AppRequest, RequestAnswer};
use shardline_shared::sign::{self, Domain, KeyPair};
use shardline_shared::{decode, encode, DeviceId};

fuzz_target!(|data: &[u8]| {
    let device_key = KeyPair::from_seed(&[3; 32]);
    let allocator_key = KeyPair::from_seed(&[1; 32]);
    let me = DeviceId::new("router-1").expect("valid id");

    if let Ok(req) = request::open_request(data, &me, &device_key.public_key()) {
        assert_eq!(
            req.device, me,
            "a request opened under another device's topic"
        );
        let env =
            sign::parse_envelope(data, request::MAX_REQUEST_BYTES).expect("opened bytes parse");
        for entry in &env.signatures {
            sign::verify_entry(
                Domain::AppRequest,
                &env.payload,
                entry,
                &device_key.public_key(),
            )
            .expect("an opened request verifies under the device key");
        }
        let back: AppRequest = decode(&encode(&req)).expect("re-encoded request decodes");
        assert_eq!(back, req);
    }
    let lookup = |id| (id == allocator_key.id()).then_some(allocator_key.public_key());
    if let Ok(answer) = request::open_answer(data, lookup) {
        let env =
            sign::parse_envelope(data, request::MAX_ANSWER_BYTES).expect("opened bytes parse");
        for entry in &env.signatures {
            sign::verify_entry(
                Domain::RequestAnswer,
                &env.payload,
                entry,
                &allocator_key.public_key(),
            )
            .expect("an opened answer verifies under the pinned key");
        }
        let back: RequestAnswer = decode(&encode(&answer)).expect("re-encoded answer decodes");
        assert_eq!(back, answer);
    }
});
