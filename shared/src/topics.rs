//! MQTT topic names, all under `shardline/v1/`.
//!
//! Device ids are validated ([`DeviceId`]) so they can never contain MQTT
//! wildcards or separators; building a topic is therefore infallible.

use crate::assign::GroupId;
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

/// A group as three topic levels, `tenant/region/capability`: never with
/// its dots, because NATS (subject tokens are split on '.') closes the
/// connection of a client publishing a topic with a dot, and RabbitMQ
/// rewrites dots to '/' (measured, `allocator/benches/broker_cluster.rs`).
/// The parts cannot hold '/', '.' or wildcards ([`GroupId`]).
fn group_levels(group: &GroupId) -> String {
    format!(
        "{}/{}/{}",
        group.tenant(),
        group.region(),
        group.capability()
    )
}

/// Parses `tenant/region/capability` at the start of `rest`; returns the
/// group and what follows its third level (with its leading '/', if any).
fn split_group(rest: &str) -> Option<(GroupId, &str)> {
    let mut it = rest.splitn(4, '/');
    let (t, r, c) = (it.next()?, it.next()?, it.next()?);
    let tail_at = t.len() + r.len() + c.len() + 2;
    let group = GroupId::of(t, r, c).ok()?;
    Some((group, &rest[tail_at..]))
}

/// cloud → agent, QoS 1, **retained**: the group's signed assignment object
/// ([`crate::assign::seal_assignment`]), republished at every renewal so a
/// device that (re)subscribes on any broker node fetches the current one.
/// `shardline/v1/assign/{tenant}/{region}/{capability}`.
pub fn assignment(group: &GroupId) -> String {
    format!("{PREFIX}/assign/{}", group_levels(group))
}

/// All groups' assignment objects (what an allocator's API or a test reads).
pub const ALL_ASSIGNMENTS: &str = "shardline/v1/assign/+/+/+";

/// The group of an `assign/{tenant}/{region}/{capability}` topic.
pub fn assignment_group(topic: &str) -> Option<GroupId> {
    let rest = topic.strip_prefix(PREFIX)?.strip_prefix("/assign/")?;
    match split_group(rest)? {
        (group, "") => Some(group),
        _ => None,
    }
}

/// Group-routed uplink:
/// `shardline/v1/g/{tenant}/{region}/{capability}/dev/{device}/{kind}`.
///
/// A device that holds a valid assignment publishes its reports, acks,
/// explicit requests and diagnostics here instead of on the plain
/// `dev/{device}/…` topic, so the allocator server its group is assigned to
/// (and only that one) reads them with [`group_uplink_filter`]: brokers
/// without MQTT shared subscriptions (RabbitMQ 3.10, NATS 2.9) can then
/// split the fleet among allocators by assignment. Without an assignment
/// (first boot, an expired object, a region cut off) the device uses the
/// plain topics, which the instance serving unassigned devices reads.
/// Status (retained, with the last will) and enrolment stay plain.
pub fn routed(group: &GroupId, device: &DeviceId, kind: TopicKind) -> String {
    format!(
        "{PREFIX}/g/{}/dev/{device}/{}",
        group_levels(group),
        kind.suffix()
    )
}

/// What an allocator serving `group` subscribes to: every device-side
/// uplink of the group (`g/{tenant}/{region}/{capability}/dev/+/+`).
pub fn group_uplink_filter(group: &GroupId) -> String {
    format!("{PREFIX}/g/{}/dev/+/+", group_levels(group))
}

/// The group of a [`group_uplink_filter`] (`None` for any other filter).
pub fn uplink_filter_group(filter: &str) -> Option<GroupId> {
    let rest = filter.strip_prefix(PREFIX)?.strip_prefix("/g/")?;
    match split_group(rest)? {
        (group, "/dev/+/+") => Some(group),
        _ => None,
    }
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

impl TopicKind {
    /// The last level of the topic name.
    pub fn suffix(self) -> &'static str {
        match self {
            TopicKind::Report => "report",
            TopicKind::Status => "status",
            TopicKind::Ack => "ack",
            TopicKind::Instr => "instr",
            TopicKind::Enroll => ENROLL_SUFFIX,
            TopicKind::Request => "request",
            TopicKind::Answer => "answer",
            TopicKind::Diagnostics => "diag",
        }
    }

    /// Whether a device sends this kind (everything but the allocator's
    /// instructions and answers).
    pub fn is_uplink(self) -> bool {
        !matches!(self, TopicKind::Instr | TopicKind::Answer)
    }

    /// Whether a device may send this kind on a group-routed topic
    /// ([`routed`]): the uplinks an assigned allocator serves.
    pub fn is_routable(self) -> bool {
        matches!(
            self,
            TopicKind::Report | TopicKind::Ack | TopicKind::Request | TopicKind::Diagnostics
        )
    }

    fn from_suffix(s: &str) -> Option<Self> {
        Some(match s {
            "report" => TopicKind::Report,
            "status" => TopicKind::Status,
            "ack" => TopicKind::Ack,
            "instr" => TopicKind::Instr,
            ENROLL_SUFFIX => TopicKind::Enroll,
            "request" => TopicKind::Request,
            "answer" => TopicKind::Answer,
            "diag" => TopicKind::Diagnostics,
            _ => return None,
        })
    }
}

/// Splits `shardline/v1/dev/{device}/{kind}`, or its group-routed form
/// `shardline/v1/g/{tenant}/{region}/{capability}/dev/{device}/{kind}` (routable kinds only), into
/// its device and kind. Returns `None` for anything else, including an
/// invalid device id or group. [`parse_routed`] also gives the group.
pub fn parse(topic: &str) -> Option<(DeviceId, TopicKind)> {
    parse_routed(topic).map(|(_, device, kind)| (device, kind))
}

/// As [`parse`], with the group of a group-routed topic (`None` on a plain
/// topic).
pub fn parse_routed(topic: &str) -> Option<(Option<GroupId>, DeviceId, TopicKind)> {
    let rest = topic.strip_prefix(PREFIX)?;
    let (group, rest) = if let Some(rest) = rest.strip_prefix("/g/") {
        let (group, rest) = split_group(rest)?;
        (Some(group), rest.strip_prefix('/')?)
    } else {
        (None, rest.strip_prefix('/')?)
    };
    let rest = rest.strip_prefix("dev/")?;
    let (device, kind) = rest.split_once('/')?;
    let kind = TopicKind::from_suffix(kind)?;
    if group.is_some() && !kind.is_routable() {
        return None;
    }
    Some((group, DeviceId::new(device).ok()?, kind))
}

/// Topic authorization for a device's broker login (DESIGN.md: "each
/// client may touch only its own topics"): a device may publish only its own
/// report, ack, status, enrolment request and explicit requests.
pub fn device_may_publish(device: &DeviceId, topic: &str) -> bool {
    matches!(parse(topic), Some((d, kind)) if kind.is_uplink() && &d == device)
}

/// … and subscribe only to its own instruction and answer topics and to
/// one group's assignment object (exactly: no wildcards, which could reach
/// other devices' topics; assignments are signed and hold no secret, so any
/// group's may be read).
pub fn device_may_subscribe(device: &DeviceId, filter: &str) -> bool {
    filter == instr(device) || filter == answer(device) || assignment_group(filter).is_some()
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
    fn group_routed_topics_round_trip() {
        let d = DeviceId::new("r1").unwrap();
        let g = GroupId::new("acme.eu-west.vpn").unwrap();
        assert_eq!(assignment(&g), "shardline/v1/assign/acme/eu-west/vpn");
        assert_eq!(assignment_group(&assignment(&g)), Some(g.clone()));
        assert_eq!(assignment_group("shardline/v1/assign/a/b"), None);
        assert_eq!(assignment_group("shardline/v1/assign/a/b/c/d"), None);
        assert_eq!(assignment_group("shardline/v1/assign/a.b.c"), None);
        // No dot anywhere in a topic: NATS closes the connection for one.
        assert!(!assignment(&g).contains('.'));
        assert!(!routed(&g, &d, TopicKind::Report).contains('.'));
        assert_eq!(assignment_group("shardline/v1/assign/+/+/+"), None);
        assert_eq!(
            routed(&g, &d, TopicKind::Report),
            "shardline/v1/g/acme/eu-west/vpn/dev/r1/report"
        );
        assert_eq!(
            group_uplink_filter(&g),
            "shardline/v1/g/acme/eu-west/vpn/dev/+/+"
        );
        assert_eq!(
            uplink_filter_group(&group_uplink_filter(&g)),
            Some(g.clone())
        );
        assert_eq!(uplink_filter_group(ALL_REPORTS), None);
        assert_eq!(uplink_filter_group("shardline/v1/g/+/+/+/dev/+/+"), None);
        assert_eq!(
            uplink_filter_group("shardline/v1/g/acme/eu-west/vpn/dev/+/report"),
            None
        );
        for kind in [
            TopicKind::Report,
            TopicKind::Ack,
            TopicKind::Request,
            TopicKind::Diagnostics,
        ] {
            let t = routed(&g, &d, kind);
            assert_eq!(parse_routed(&t), Some((Some(g.clone()), d.clone(), kind)));
            assert_eq!(parse(&t), Some((d.clone(), kind)));
            assert!(device_may_publish(&d, &t), "{t}");
            assert!(!device_may_publish(&DeviceId::new("r2").unwrap(), &t));
        }
        // Status and enrolment are never routed; instructions never go up.
        for kind in [TopicKind::Status, TopicKind::Enroll, TopicKind::Instr] {
            assert_eq!(parse(&routed(&g, &d, kind)), None);
        }
        assert_eq!(parse("shardline/v1/g/bad/dev/r1/report"), None);
        assert_eq!(parse("shardline/v1/g/a.b.c/dev/r1/report"), None);
        assert_eq!(parse("shardline/v1/g/a/b/dev/r1/report"), None);
        assert_eq!(parse("shardline/v1/g/a/b/c/dev/r1/x/report"), None);
        assert_eq!(
            parse_routed(&report(&d)),
            Some((None, d.clone(), TopicKind::Report))
        );
        assert!(device_may_subscribe(&d, &assignment(&g)));
        assert!(!device_may_subscribe(&d, ALL_ASSIGNMENTS));
        assert!(!device_may_subscribe(&d, "shardline/v1/assign/#"));
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
