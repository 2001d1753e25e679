//! What the engine learns from its own decisions on one device (issue 17):
//! the measured error of its forecasts (prediction turns itself off where
//! it does not pay) and the QoS change observed after shifts (the gain the
//! rebalancer expects from the next one).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FeedbackState {}
