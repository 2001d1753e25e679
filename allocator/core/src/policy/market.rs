//! Seed 002's credit market (issue 17): credits earned by lending units,
//! spent in a per-tick auction of a pool's spare units.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CreditAccount {}
