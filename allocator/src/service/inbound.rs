//! What flows into the core thread: MQTT messages, verifier results, ticks,
//! operator commands with their reply channels, reload requests. Shared by the
//! runner (`run`), the MQTT link, the verifier threads and the admin API, so
//! none of them imports another.

use super::core::{Command, Reply, VerifiedMsg};
use shardline_shared::topics;
use shardline_shared::DeviceId;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;

/// What goes into the core.
#[derive(Debug)]
pub enum Inbound {
    Mqtt {
        topic: String,
        payload: Vec<u8>,
    },
    /// A report or ack a verifier thread checked.
    Verified(VerifiedMsg),
    Connected,
    Tick,
    Command(Box<Command>, oneshot::Sender<Reply>),
    /// The store refused writes to these devices (another instance wrote
    /// them first): reload them.
    Reload(Vec<DeviceId>),
    /// Messages wait in the core's [`VerifiedInbox`](super::verified::VerifiedInbox).
    VerifiedReady,
    Shutdown,
}

impl Inbound {
    /// The device this message is about, if any (the shared-store check
    /// reads the versions of exactly these before a batch).
    pub fn device(&self) -> Option<DeviceId> {
        match self {
            Inbound::Mqtt { topic, .. } => topics::parse(topic).map(|(d, _)| d),
            Inbound::Verified(v) => Some(v.device().clone()),
            Inbound::Command(cmd, _) => cmd.device().cloned(),
            _ => None,
        }
    }
}

/// Milliseconds since the Unix epoch: the only clock the core is given.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
