//! The MQTT link of the service: subscribes to the fleet's topics on every
//! (re)connect, routes device-signed reports and acks to their verifier
//! thread and everything else to the core.

use super::core::ToVerify;
use super::inbound::Inbound;
use super::verifiers::{shard_of, VerifierTx};
use rumqttc::{AsyncClient, Event, Packet, QoS};
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

/// Runs the MQTT event loop until the core is gone. `shared`: subscribe to
/// reports, acks, enrolments and explicit requests through the allocators' shared subscription.
pub async fn run(
    mut eventloop: rumqttc::EventLoop,
    client: AsyncClient,
    tx: mpsc::Sender<Inbound>,
    verifiers: Vec<VerifierTx>,
    shared: bool,
    metrics: Arc<Metrics>,
) {
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
    let mut backoff = BACKOFF_MIN;
    let mut connected_at: Option<std::time::Instant> = None;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if let Some((device, kind @ (TopicKind::Report | TopicKind::Ack))) =
                    topics::parse(&p.topic)
                {
                    let v = &verifiers[shard_of(&device, verifiers.len())];
                    if v.send(ToVerify {
                        device,
                        kind,
                        payload: p.payload.to_vec(),
                    })
                    .await
                    .is_err()
                    {
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
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected_at = Some(std::time::Instant::now());
                Metrics::inc(&metrics.mqtt_reconnects);
                tracing::info!("connected to the MQTT broker");
                // Statuses are never shared: retained ones are not delivered
                // through shared subscriptions, and every instance wants them.
                let filters = [
                    report_filter.clone(),
                    ack_filter.clone(),
                    enroll_filter.clone(),
                    request_filter.clone(),
                    diag_filter.clone(),
                    topics::ALL_STATUS.to_owned(),
                ];
                let client = client.clone();
                tokio::spawn(async move {
                    for f in filters {
                        if let Err(e) = client.subscribe(f.clone(), QoS::AtLeastOnce).await {
                            tracing::error!(filter = %f, error = %e, "subscribe failed");
                        }
                    }
                });
                if tx.send(Inbound::Connected).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
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
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}
