//! Helpers for the workspace-level integration tests.
#![forbid(unsafe_code)]
