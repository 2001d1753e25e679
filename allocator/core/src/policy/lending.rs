//! Seed 002's loan record and good-neighbour reports (issue 17): how a
//! device borrows (how often, how successfully), whether it returns on
//! time and in full, what its loans did to the lender's QoS, the harm its
//! neighbours report (weighted by the reporter's reputation, bounded per
//! reporter), and its consent policy as a lender.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LendingState {}
