//! The policy engine: sans-IO and deterministic (same events + same clock ⇒
//! same instructions). No I/O, no wall clock: `now` is an argument.
pub mod simulate;
