//! MQTT topic names, all under `shardline/v1/`.
//!
//! Device ids are validated ([`DeviceId`]) so they can never contain MQTT
//! wildcards or separators; building a topic is therefore infallible.

use crate::DeviceId;

pub const PREFIX: &str = "shardline/v1";

/// agent → cloud, QoS 1, signed by the device key.
pub fn report(device: &DeviceId) -> String {
    format!("{PREFIX}/dev/{device}/report")
}

/// agent → cloud, retained; the MQTT last will publishes *offline* here.
pub fn status(device: &DeviceId) -> String {
    format!("{PREFIX}/dev/{device}/status")
}

/// agent → cloud: the outcome of each instruction, signed by the device key.
pub fn ack(device: &DeviceId) -> String {
    format!("{PREFIX}/dev/{device}/ack")
}

/// cloud → agent, QoS 1: signed instructions and key rotations.
pub fn instr(device: &DeviceId) -> String {
    format!("{PREFIX}/dev/{device}/instr")
}

/// Topic suffix of the bootstrap-token enrolment request.
pub const ENROLL_SUFFIX: &str = "enroll";

/// agent → cloud, QoS 1: a bootstrap-token enrolment request
/// ([`crate::msg::EnrollRequest`], signed by the key it enrols). Sent only
/// by a device that is not enrolled yet; never retained (it carries a token).
pub fn enroll(device: &DeviceId) -> String {
    format!("{PREFIX}/dev/{device}/{ENROLL_SUFFIX}")
}

/// The device of a `…/dev/{device}/enroll` topic.
pub fn enroll_device(topic: &str) -> Option<DeviceId> {
    match parse(topic)? {
        (device, TopicKind::Enroll) => Some(device),
        _ => None,
    }
}

/// agent → cloud, QoS 1: an explicit request from a local application
/// ([`crate::request::AppRequest`], signed by the device key).
pub fn request(device: &DeviceId) -> String {
    format!("{PREFIX}/dev/{device}/request")
}

/// cloud → agent, QoS 1: the allocator's signed answers to the device's
/// explicit requests ([`crate::request::RequestAnswer`]).
pub fn answer(device: &DeviceId) -> String {
    format!("{PREFIX}/dev/{device}/answer")
}

/// agent → cloud, QoS 1: the device's signed diagnostics answer
/// ([`crate::diag::Diagnostics`]) to an operator's request.
pub fn diagnostics(device: &DeviceId) -> String {
    format!("{PREFIX}/dev/{device}/diag")
}

/// All devices' diagnostics answers.
pub const ALL_DIAGNOSTICS: &str = "shardline/v1/dev/+/diag";

/// Subscription filters for an allocator: all devices' reports, acks, statuses.
pub const ALL_REPORTS: &str = "shardline/v1/dev/+/report";
pub const ALL_ACKS: &str = "shardline/v1/dev/+/ack";
pub const ALL_STATUS: &str = "shardline/v1/dev/+/status";
/// All devices' enrolment requests.
pub const ALL_ENROLL: &str = "shardline/v1/dev/+/enroll";
/// All devices' explicit requests (read through [`shared`] when scaled out).
pub const ALL_REQUESTS: &str = "shardline/v1/dev/+/request";

/// Shared-subscription group through which scaled-out allocators split reports.
pub const SHARED_GROUP: &str = "allocators";

/// `$share/allocators/<filter>`: one allocator instance of the group receives each message.
pub fn shared(filter: &str) -> String {
    format!("$share/{SHARED_GROUP}/{filter}")
}

/// The kind of a device topic, parsed back from a full topic name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    Report,
    Status,
    Ack,
    Instr,
    /// `dev/{device}/enroll`: a bootstrap-token enrolment request.
    Enroll,
    /// `dev/{device}/request`: an explicit request from a local application.
    Request,
    /// `dev/{device}/answer`: the allocator's answer to one.
    Answer,
    /// `dev/{device}/diag`: the device's diagnostics answer.
    Diagnostics,
}

/// Splits `shardline/v1/dev/{device}/{kind}` into its device and kind.
/// Returns `None` for anything else, including an invalid device id.
pub fn parse(topic: &str) -> Option<(DeviceId, TopicKind)> {
    let rest = topic.strip_prefix(PREFIX)?.strip_prefix("/dev/")?;
    let (device, kind) = rest.split_once('/')?;
    let kind = match kind {
        "report" => TopicKind::Report,
        "status" => TopicKind::Status,
        "ack" => TopicKind::Ack,
        "instr" => TopicKind::Instr,
        ENROLL_SUFFIX => TopicKind::Enroll,
        "request" => TopicKind::Request,
        "answer" => TopicKind::Answer,
        "diag" => TopicKind::Diagnostics,
        _ => return None,
    };
    Some((DeviceId::new(device).ok()?, kind))
}

/// Topic authorization for a device's broker login (DESIGN.md: "each
/// client may touch only its own topics"): a device may publish only its own
/// report, ack, status, enrolment request and explicit requests.
pub fn device_may_publish(device: &DeviceId, topic: &str) -> bool {
    matches!(
        parse(topic),
        Some((
            d,
            TopicKind::Report
                | TopicKind::Ack
                | TopicKind::Status
                | TopicKind::Enroll
                | TopicKind::Request
                | TopicKind::Diagnostics
        )) if &d == device
    )
}

/// … and subscribe only to its own instruction and answer topics (exactly:
/// no wildcards, which could reach other devices' topics).
pub fn device_may_subscribe(device: &DeviceId, filter: &str) -> bool {
    filter == instr(device) || filter == answer(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_match_the_design() {
        let d = DeviceId::new("r1").unwrap();
        assert_eq!(report(&d), "shardline/v1/dev/r1/report");
        assert_eq!(status(&d), "shardline/v1/dev/r1/status");
        assert_eq!(ack(&d), "shardline/v1/dev/r1/ack");
        assert_eq!(instr(&d), "shardline/v1/dev/r1/instr");
        assert_eq!(enroll(&d), "shardline/v1/dev/r1/enroll");
        assert_eq!(request(&d), "shardline/v1/dev/r1/request");
        assert_eq!(answer(&d), "shardline/v1/dev/r1/answer");
        assert_eq!(diagnostics(&d), "shardline/v1/dev/r1/diag");
        assert_eq!(
            parse(&diagnostics(&d)),
            Some((d.clone(), TopicKind::Diagnostics))
        );
        assert!(device_may_publish(&d, &diagnostics(&d)));
        assert!(!device_may_publish(
            &d,
            &diagnostics(&DeviceId::new("r2").unwrap())
        ));
        assert_eq!(ALL_REQUESTS, "shardline/v1/dev/+/request");
        assert_eq!(ALL_ENROLL, format!("{PREFIX}/dev/+/{ENROLL_SUFFIX}"));
        assert_eq!(
            shared(ALL_REPORTS),
            "$share/allocators/shardline/v1/dev/+/report"
        );
    }

    #[test]
    fn parse_round_trips_and_refuses_strangers() {
        let d = DeviceId::new("r1").unwrap();
        assert_eq!(parse(&ack(&d)), Some((d.clone(), TopicKind::Ack)));
        assert_eq!(parse(&enroll(&d)), Some((d.clone(), TopicKind::Enroll)));
        assert_eq!(enroll_device(&enroll(&d)), Some(d.clone()));
        assert_eq!(enroll_device(&report(&d)), None);
        assert_eq!(enroll_device("shardline/v1/dev/a+b/enroll"), None);
        assert_eq!(enroll_device("shardline/v1/dev/r1/x/enroll"), None);
        assert_eq!(parse("shardline/v1/dev/r1/other"), None);
        assert_eq!(parse("shardline/v1/dev/a+b/report"), None);
        assert_eq!(parse("elsewhere/dev/r1/report"), None);
    }

    #[test]
    fn a_device_may_touch_only_its_own_topics() {
        let d = DeviceId::new("r1").unwrap();
        let other = DeviceId::new("r2").unwrap();
        for t in [report(&d), ack(&d), status(&d), enroll(&d), request(&d)] {
            assert!(device_may_publish(&d, &t), "{t}");
            assert!(!device_may_publish(&other, &t), "{t}");
        }
        assert!(
            !device_may_publish(&d, &instr(&d)),
            "instructions come from the cloud"
        );
        assert!(!device_may_publish(&d, "shardline/v1/dev/r1/report/x"));
        assert!(!device_may_publish(&d, "other/topic"));
        assert!(
            !device_may_publish(&d, &answer(&d)),
            "answers come from the cloud"
        );
        assert!(device_may_subscribe(&d, &instr(&d)));
        assert!(device_may_subscribe(&d, &answer(&d)));
        assert!(!device_may_subscribe(&d, &answer(&other)));
        for f in [
            instr(&other),
            report(&d),
            "shardline/v1/dev/+/instr".to_owned(),
            "shardline/v1/#".to_owned(),
            "#".to_owned(),
        ] {
            assert!(!device_may_subscribe(&d, &f), "{f}");
        }
    }
}
