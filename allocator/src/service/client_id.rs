//! The allocator's MQTT client id (issue 19). A persistent session
//! (`[broker] persistent_session = true`, or `uplink = "routed"`, which turns
//! it on) is resumed by the broker only under the same client id: a new id
//! at each start leaves the messages the broker queued for the last one
//! stranded in a session nobody resumes. So when the session persists the id
//! is fixed: `[broker] client_id` when given, else derived from `[instance]
//! id` (`shardline-allocator-{id}`, unique because instance ids are). A
//! configuration that persists the session with neither, or that turns
//! persistence off while `uplink = "routed"` needs it, is refused at load
//! (`config.rs` names file, line and field). Without persistence an id not
//! configured is per process, as before.

use super::config::{BrokerConfig, UplinkMode};

/// What derived ids start with.
pub const PREFIX: &str = "shardline-allocator-";

/// Whether the configuration asks for a session that persists (it does so
/// on an external broker; the embedded one is in the same process).
pub fn persistence_requested(b: &BrokerConfig) -> bool {
    b.persistent_session || b.uplink == UplinkMode::Routed
}

/// The client id this instance connects with: the configured one, else the
/// one derived from `instance_id` when the session persists, else one per
/// process.
pub fn effective(b: &BrokerConfig, instance_id: &str) -> String {
    if !b.client_id.is_empty() {
        b.client_id.clone()
    } else if persistence_requested(b) {
        format!("{PREFIX}{instance_id}")
    } else {
        format!("{PREFIX}{}", std::process::id())
    }
}

/// Which keys the file wrote itself (a default cannot be told from a value
/// written equal to it after deserialisation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    pub instance_id: bool,
    pub persistent_session: bool,
}

impl Written {
    /// The keys present in `text` (already parsed once, so valid TOML).
    pub fn of(text: &str) -> Self {
        let Ok(t) = text.parse::<toml::Table>() else {
            return Self::default();
        };
        let has = |section: &str, key: &str| {
            t.get(section)
                .and_then(|s| s.as_table())
                .is_some_and(|s| s.contains_key(key))
        };
        Self {
            instance_id: has("instance", "id"),
            persistent_session: has("broker", "persistent_session"),
        }
    }
}

/// The `[broker]` field at fault and why, when the id and the session's
/// persistence clash.
pub fn check(b: &BrokerConfig, written: Written) -> Result<(), (&'static str, String)> {
    if b.uplink == UplinkMode::Routed && written.persistent_session && !b.persistent_session {
        return Err((
            "persistent_session",
            "uplink = \"routed\" keeps the MQTT session (the routed uplinks of this \
             instance's groups queue at the broker while it is away); \
             persistent_session = false contradicts it: remove the line"
                .into(),
        ));
    }
    if persistence_requested(b) && b.client_id.trim().is_empty() && !written.instance_id {
        let field = if b.persistent_session {
            "persistent_session"
        } else {
            "uplink"
        };
        return Err((
            field,
            "a persistent MQTT session needs the same client id at every start, or the \
             messages queued for it are stranded: set [broker] client_id, or [instance] id \
             (the id is then shardline-allocator-{id})"
                .into(),
        ));
    }
    if !b.client_id.is_empty() && b.client_id.trim() != b.client_id {
        return Err((
            "client_id",
            "must not be blank or start or end with whitespace".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker(uplink: UplinkMode, persistent: bool, id: &str) -> BrokerConfig {
        BrokerConfig {
            uplink,
            persistent_session: persistent,
            client_id: id.into(),
            ..BrokerConfig::default()
        }
    }

    #[test]
    fn a_persistent_session_gets_the_same_id_at_every_start() {
        let b = broker(UplinkMode::Routed, false, "");
        assert_eq!(effective(&b, "alloc-a"), "shardline-allocator-alloc-a");
        let b = broker(UplinkMode::Plain, true, "");
        assert_eq!(effective(&b, "eu-1"), "shardline-allocator-eu-1");
        let b = broker(UplinkMode::Routed, false, "mine");
        assert_eq!(effective(&b, "alloc-a"), "mine", "a configured id wins");
        // A clean session keeps the per-process id.
        let b = broker(UplinkMode::Shared, false, "");
        assert_eq!(
            effective(&b, "alloc-a"),
            format!("shardline-allocator-{}", std::process::id())
        );
    }

    #[test]
    fn clashing_settings_name_the_field() {
        let none = Written::default();
        let id = Written {
            instance_id: true,
            ..Written::default()
        };
        assert_eq!(
            check(&broker(UplinkMode::Routed, false, ""), none)
                .unwrap_err()
                .0,
            "uplink"
        );
        assert_eq!(
            check(&broker(UplinkMode::Plain, true, ""), none)
                .unwrap_err()
                .0,
            "persistent_session"
        );
        assert!(check(&broker(UplinkMode::Plain, true, ""), id).is_ok());
        assert!(check(&broker(UplinkMode::Plain, true, "a"), none).is_ok());
        assert!(check(&broker(UplinkMode::Shared, false, ""), none).is_ok());
        let off = Written {
            instance_id: true,
            persistent_session: true,
        };
        assert_eq!(
            check(&broker(UplinkMode::Routed, false, "a"), off)
                .unwrap_err()
                .0,
            "persistent_session"
        );
        assert_eq!(
            check(&broker(UplinkMode::Shared, false, " a"), none)
                .unwrap_err()
                .0,
            "client_id"
        );
    }

    #[test]
    fn written_keys_are_told_from_defaults() {
        let w = Written::of("[broker]\npersistent_session = false\n[instance]\nid = \"a\"\n");
        assert_eq!(
            w,
            Written {
                instance_id: true,
                persistent_session: true
            }
        );
        assert_eq!(Written::of("[broker]\n"), Written::default());
    }

    #[test]
    fn config_load_refuses_a_clash_naming_file_line_and_field() {
        use super::super::config::Config;
        let err = Config::from_toml_str(
            "[broker]\nurl = \"mqtt://n1:1883\"\n\npersistent_session = true\n",
            "a.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("a.toml:4: field `persistent_session`")
                && err.contains("[instance] id"),
            "{err}"
        );
        let err = Config::from_toml_str(
            "[broker]\nuplink = \"routed\"\npersistent_session = false\n[instance]\nid = \"x\"\n",
            "b.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("b.toml:3: field `persistent_session`"),
            "{err}"
        );
        let err = Config::from_toml_str("[broker]\nuplink = \"routed\"\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.toml:2: field `uplink`"), "{err}");
        // The same instance id gives the same client id at every load.
        let text = "[broker]\nurls = [\"mqtt://n1:1883\"]\nuplink = \"routed\"\n\
                    [instance]\nid = \"eu-1\"\n";
        let a = Config::from_toml_str(text, "d.toml").unwrap();
        let b = Config::from_toml_str(text, "d.toml").unwrap();
        assert_eq!(a.mqtt_client_id(), "shardline-allocator-eu-1");
        assert_eq!(a.mqtt_client_id(), b.mqtt_client_id());
        // Without persistence nothing is asked of the operator.
        assert!(Config::from_toml_str("[broker]\nurl = \"mqtt://n1:1883\"\n", "e.toml").is_ok());
    }
}
