//! The MQTT link of the service: subscribes to the fleet's topics on every
//! (re)connect, routes device-signed reports and acks to their verifier
//! thread and everything else to the core. It hands reports on without
//! waiting (see `verifiers.rs`): a link that falls behind the embedded broker
//! loses messages the broker already acknowledged.

use super::core::ToVerify;
use super::inbound::Inbound;
use super::verifiers::Verifiers;
use rumqttc::{AsyncClient, Event, Outgoing, Packet};
use shardline_allocator_core::service::counters::Metrics;
use shardline_shared::topics::{self, TopicKind};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// First reconnect delay, doubled per failed attempt up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A connection that lasted this long resets the backoff.
const STABLE: Duration = Duration::from_secs(10);
/// First wait before subscribing again after the broker refused a
/// subscription (doubled per refused round up to [`BACKOFF_MAX`]).
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(1);

/// Runs the MQTT event loop until the core is gone. `shared`: subscribe to
/// reports, acks, enrolments and explicit requests through the allocators' shared subscription.
/// `routed` (`[broker] uplink = "routed"`, issue 19): subscribe to none of
/// them here; the assignment driver holds them (`assign.filters`) while
/// leading, with the routed filters of this instance's groups, and every
/// reconnect subscribes the held set again.
/// `nodes`: the client options for every node of a clustered broker
/// (`[broker] urls`, the event loop's own first); a failed or dropped
/// connection moves to the next node at once, and the growing backoff
/// applies only after a whole round of nodes failed.
/// `gate`: the embedded broker's [`IngestGate`](super::ingest_gate::IngestGate),
/// told what came out.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    mut eventloop: rumqttc::EventLoop,
    client: AsyncClient,
    tx: mpsc::Sender<Inbound>,
    verifiers: Verifiers,
    shared: bool,
    routed: bool,
    assign: Arc<super::assign_driver::AssignShared>,
    metrics: Arc<Metrics>,
    nodes: Vec<rumqttc::MqttOptions>,
    gate: Option<Arc<super::ingest_gate::IngestGate>>,
) {
    let mut node = 0usize;
    // Nodes tried since the last CONNACK.
    let mut failed_nodes = 0usize;
    let report_filter = if shared {
        topics::shared(topics::ALL_REPORTS)
    } else {
        topics::ALL_REPORTS.to_owned()
    };
    let ack_filter = if shared {
        topics::shared(topics::ALL_ACKS)
    } else {
        topics::ALL_ACKS.to_owned()
    };
    let enroll_filter = if shared {
        topics::shared(topics::ALL_ENROLL)
    } else {
        topics::ALL_ENROLL.to_owned()
    };
    let request_filter = if shared {
        topics::shared(topics::ALL_REQUESTS)
    } else {
        topics::ALL_REQUESTS.to_owned()
    };
    let diag_filter = if shared {
        topics::shared(topics::ALL_DIAGNOSTICS)
    } else {
        topics::ALL_DIAGNOSTICS.to_owned()
    };
    // Statuses are never shared: retained ones are not delivered
    // through shared subscriptions, and every instance wants them.
    let own_filters: Vec<String> = if routed {
        vec![topics::ALL_STATUS.to_owned()]
    } else {
        vec![
            report_filter,
            ack_filter,
            enroll_filter,
            request_filter,
            diag_filter,
            topics::ALL_STATUS.to_owned(),
        ]
    };
    // What this link holds now: its own filters and the ones the
    // assignment driver holds (read again at each (re)subscription).
    let filters = || {
        let mut all = own_filters.clone();
        all.extend(assign.held_filters());
        all
    };
    // One resubscription at a time after a refused SUBACK: a NATS node
    // refuses QoS 1 subscriptions while its JetStream cluster elects new
    // leaders (seconds after a node was lost), and without this the link
    // would stay connected but deaf.
    let retry_scheduled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut resubscribe_wait = RESUBSCRIBE_AFTER;
    let mut backoff = BACKOFF_MIN;
    let mut connected_at: Option<std::time::Instant> = None;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                // Out of the embedded broker: devices may send more.
                if let Some(g) = gate.as_deref() {
                    g.taken(&p.topic, p.topic.len() + p.payload.len());
                }
                // Group rates for the assignment engine (routed uplinks).
                assign.count_routed(&p.topic);
                if let Some((device, kind @ (TopicKind::Report | TopicKind::Ack))) =
                    topics::parse(&p.topic)
                {
                    let msg = ToVerify {
                        device,
                        kind,
                        payload: p.payload.to_vec(),
                    };
                    if verifiers.push(msg, &metrics).await.is_err() {
                        return;
                    }
                    continue;
                }
                let msg = Inbound::Mqtt {
                    topic: p.topic,
                    payload: p.payload.to_vec(),
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(c))) => {
                assign.link.connected(c.session_present);
                connected_at = Some(std::time::Instant::now());
                failed_nodes = 0;
                resubscribe_wait = RESUBSCRIBE_AFTER;
                Metrics::inc(&metrics.mqtt_reconnects);
                tracing::info!("connected to the MQTT broker");
                tokio::spawn(subscribe_all(client.clone(), assign.clone(), filters()));
                if tx.send(Inbound::Connected).await.is_err() {
                    return;
                }
            }
            Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => assign.link.sent(pkid),
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                // The filters of its SUBACK (a granted group filter is
                // counted by the ingest gate from here on).
                let named = assign.link.acked(ack.pkid, &ack.return_codes);
                let refused = ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                if refused && !retry_scheduled.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    // Doubling per refused round, reset by a new connection.
                    let wait = resubscribe_wait;
                    resubscribe_wait = (resubscribe_wait * 2).min(BACKOFF_MAX);
                    tracing::warn!(
                        pkid = ack.pkid,
                        filters = %refused_filters(named.as_deref()),
                        wait_ms = wait.as_millis() as u64,
                        "the broker refused a subscription; subscribing again"
                    );
                    let (client, assign, filters, flag) = (
                        client.clone(),
                        assign.clone(),
                        filters(),
                        retry_scheduled.clone(),
                    );
                    tokio::spawn(async move {
                        tokio::time::sleep(wait).await;
                        flag.store(false, std::sync::atomic::Ordering::SeqCst);
                        subscribe_all(client, assign, filters).await;
                    });
                } else if refused {
                    tracing::warn!(
                        pkid = ack.pkid,
                        filters = %refused_filters(named.as_deref()),
                        "the broker refused a subscription; a new round is already scheduled"
                    );
                }
            }
            Ok(_) => {}
            Err(e) => {
                assign.link.connection_lost();
                // A connection that drops right after it was made (a broker
                // without the packet cap replaying an oversize retained
                // message, say) must not become a reconnect loop: back off,
                // and start again from the minimum only after a connection
                // that lasted.
                if connected_at.take().is_some_and(|t| t.elapsed() >= STABLE) {
                    backoff = BACKOFF_MIN;
                }
                if matches!(
                    e,
                    rumqttc::ConnectionError::MqttState(rumqttc::StateError::Deserialization(
                        rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(_)
                    ))
                ) {
                    tracing::error!(error = %e, "the broker sent a packet over this client's limit: the broker must cap packets at 1 MiB (max_packet_size)");
                } else {
                    tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "MQTT connection lost; reconnecting");
                }
                if nodes.len() > 1 {
                    // Unacknowledged publishes and the subscriptions (made
                    // again on CONNACK) carry over: only the address changes.
                    node = (node + 1) % nodes.len();
                    eventloop.mqtt_options = nodes[node].clone();
                    failed_nodes += 1;
                    let (host, port) = eventloop.mqtt_options.broker_address();
                    tracing::warn!(%host, port, "moving to the next broker node");
                    if failed_nodes < nodes.len() {
                        tokio::time::sleep(BACKOFF_MIN).await;
                        continue;
                    }
                    failed_nodes = 0;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Subscribes (QoS 1) to every filter, one SUBSCRIBE each, through the
/// link's record of them; subscribing again to a filter the broker already
/// holds is harmless.
async fn subscribe_all(
    client: AsyncClient,
    assign: Arc<super::assign_driver::AssignShared>,
    filters: Vec<String>,
) {
    for f in filters {
        if let Err(e) = assign.link.subscribe(&client, f.clone()).await {
            tracing::error!(filter = %f, error = %e, "subscribe failed");
        }
    }
}

/// The refused filters of a SUBACK, for its log: `filters` from
/// [`LinkSubs::acked`](super::link_subs::LinkSubs::acked), or "unknown"
/// when its SUBSCRIBE could not be named (sent before a reconnect, say).
fn refused_filters(filters: Option<&[(String, bool)]>) -> String {
    match filters {
        Some(f) => f
            .iter()
            .filter(|(_, granted)| !granted)
            .map(|(f, _)| f.as_str())
            .collect::<Vec<_>>()
            .join(","),
        None => "unknown".to_owned(),
    }
}

/// `opts` with another broker address: the settings the service sets
/// (rumqttc has no setter for the address alone).
pub fn options_for_node(
    opts: &rumqttc::MqttOptions,
    host: String,
    port: u16,
) -> rumqttc::MqttOptions {
    let mut o = rumqttc::MqttOptions::new(opts.client_id(), host, port);
    o.set_keep_alive(opts.keep_alive())
        .set_clean_session(opts.clean_session())
        .set_max_packet_size(opts.max_packet_size(), opts.max_packet_size())
        .set_inflight(opts.inflight())
        .set_request_channel_capacity(opts.request_channel_capacity())
        .set_transport(opts.transport());
    if let Some(login) = opts.credentials() {
        o.set_credentials(login.username, login.password);
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::link_subs::SubBook;
    use rumqttc::{QoS, SubscribeReasonCode};

    #[test]
    fn a_refused_subacks_log_names_the_refused_filters() {
        let mut book = SubBook::default();
        book.connected(false);
        book.queued(vec![topics::ALL_REPORTS.into(), topics::ALL_ACKS.into()]);
        book.sent(41);
        let named = book.acked(
            41,
            &[
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::Failure,
            ],
        );
        assert_eq!(refused_filters(named.as_deref()), topics::ALL_ACKS);
        // A SUBACK whose SUBSCRIBE was not recorded says so.
        let unknown = book.acked(42, &[SubscribeReasonCode::Failure]);
        assert_eq!(refused_filters(unknown.as_deref()), "unknown");
    }
}
