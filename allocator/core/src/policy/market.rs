//! Seed 002's credit market (issue 17): credits earned by lending units,
//! spent in a per-tick auction of a pool's spare units.
//!
//! Everything here is pure: the per-device [`CreditAccount`] (persisted in
//! `DeviceState::credits`), the bid rule ([`bid_limit`]) and the clearing
//! rule ([`clear`]): bids and asks in, fills and one clearing price out.
//! The engine (`engine/market.rs`) gathers the bids and asks of each
//! tenant pool, calls [`clear`] and turns the fills into transfers.
//!
//! Credits are integers (milli-credits, `u64`): balances are moved, never
//! rounded, so "buyers pay = sellers earn" holds exactly.
//!
//! # The clearing rule: a uniform-price auction of whole bids
//!
//! * Bids are sorted by limit price (highest first), then by the priority
//!   of the capability they are for (highest first), then by device id.
//!   Asks are sorted by reserve price (lowest first), then by the units
//!   offered (most first, so few sellers are touched), then by device id.
//! * A bid is all or nothing (a capability needs all its units). Bids are
//!   taken in that order; one is accepted when the units accepted so far
//!   plus its own fit both the units offered at a reserve at or below its
//!   limit and the pool's per-tick limit, else it is passed over (a big bid
//!   does not block smaller ones behind it).
//! * The clearing price is the higher of (a) the reserve of the dearest
//!   ask the winners need and (b) the best limit among the bids after the
//!   last winner (the highest rejected bid that was not passed over for its
//!   size alone). Every winner pays it per unit: it is at most every
//!   winner's limit (limits only fall along the order) and at least every
//!   used ask's reserve.

use serde::{Deserialize, Serialize};
use shardline_shared::ids::DeviceId;
use shardline_shared::msg::ShardKind;
use std::fmt;

/// One credit in the integer unit credits are kept in.
pub const MILLI: u64 = 1000;

/// Market parameters (`[market]` in the policy configuration).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MarketConfig {
    /// Credits a device of a pool starts with (milli-credits).
    pub initial_milli: u64,
    /// Earned per unit lent (borrowing or shifting) per minute (milli-credits).
    pub earn_milli_per_unit_minute: u64,
    /// Sellers' reserve: no unit sells below this per unit (milli-credits).
    pub reserve_milli: u64,
    /// Willingness to pay per point of the unmet capability's priority
    /// (milli-credits per unit): priority 80 at 40 ⇒ 3.2 credits/unit.
    pub milli_per_priority: u64,
    /// A bid never commits more than this share (per mille) of the balance.
    pub max_spend_permille: u64,
    /// Units sold per pool, per kind, per market run.
    pub max_units_per_tick: u32,
    /// Market units one device may hold at once, per kind.
    pub max_units_per_device: u32,
    /// How long bought units stay (the transfer's lease).
    pub lease_ms: u64,
    /// The market runs at most this often.
    pub interval_ms: u64,
    /// Entries kept in an account's history.
    pub history_len: usize,
}

impl Default for MarketConfig {
    fn default() -> Self {
        Self {
            initial_milli: 20 * MILLI,
            earn_milli_per_unit_minute: 20,
            reserve_milli: MILLI,
            milli_per_priority: 40,
            max_spend_permille: 500,
            max_units_per_tick: 8,
            max_units_per_device: 4,
            lease_ms: 30 * 60_000,
            interval_ms: 60_000,
            history_len: 8,
        }
    }
}

impl MarketConfig {
    /// Values the market cannot work with, as (field, what is wrong).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        for (field, v) in [
            ("market.lease_ms", self.lease_ms),
            ("market.interval_ms", self.interval_ms),
            ("market.reserve_milli", self.reserve_milli),
        ] {
            if v == 0 {
                return Err((field, "must be > 0".into()));
            }
        }
        if self.max_spend_permille > 1000 {
            return Err((
                "market.max_spend_permille",
                format!("must be at most 1000, found {}", self.max_spend_permille),
            ));
        }
        Ok(())
    }
}

/// One market event of an account, in words for operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarketEntry {
    pub at_ms: u64,
    pub text: String,
}

/// A device's credits. Invariant: `balance_milli = granted_milli +
/// earned_milli + sold_milli − bought_milli`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CreditAccount {
    pub balance_milli: u64,
    /// The initial credits were granted (the account exists).
    pub opened: bool,
    pub granted_milli: u64,
    /// Earned by lending units (minted, not paid by anyone).
    pub earned_milli: u64,
    /// Received from buyers.
    pub sold_milli: u64,
    /// Paid to sellers.
    pub bought_milli: u64,
    /// Unit-milliseconds lent not yet turned into credits (less than one
    /// unit-minute: credits are earned per whole unit-minute, exactly).
    pub lent_unit_ms: u64,
    /// Lending is accounted up to this time.
    pub accrued_to_ms: u64,
    /// Latest market events, oldest first.
    pub history: Vec<MarketEntry>,
}

impl CreditAccount {
    /// Grants the initial credits once.
    pub fn open(&mut self, cfg: &MarketConfig, now: u64) -> bool {
        if self.opened {
            return false;
        }
        self.opened = true;
        self.granted_milli = self.granted_milli.saturating_add(cfg.initial_milli);
        self.balance_milli = self.balance_milli.saturating_add(cfg.initial_milli);
        self.accrued_to_ms = self.accrued_to_ms.max(now);
        true
    }

    /// Adds lent unit-milliseconds and turns whole unit-minutes into credits.
    pub fn accrue(&mut self, cfg: &MarketConfig, unit_ms: u64) -> u64 {
        self.lent_unit_ms = self.lent_unit_ms.saturating_add(unit_ms);
        let minutes = self.lent_unit_ms / 60_000;
        self.lent_unit_ms %= 60_000;
        let earned = minutes.saturating_mul(cfg.earn_milli_per_unit_minute);
        self.earned_milli = self.earned_milli.saturating_add(earned);
        self.balance_milli = self.balance_milli.saturating_add(earned);
        earned
    }

    /// Pays `amount` to `seller`; refused (nothing moves) above the balance.
    pub fn pay(&mut self, seller: &mut CreditAccount, amount: u64) -> Result<(), MarketError> {
        if amount > self.balance_milli {
            return Err(MarketError::InsufficientCredits {
                balance_milli: self.balance_milli,
                amount_milli: amount,
            });
        }
        self.balance_milli -= amount;
        self.bought_milli = self.bought_milli.saturating_add(amount);
        seller.balance_milli = seller.balance_milli.saturating_add(amount);
        seller.sold_milli = seller.sold_milli.saturating_add(amount);
        Ok(())
    }

    /// Records an event unless it says what the latest one already says
    /// (an unmet bid repeated every tick would churn the stored state).
    pub fn note(&mut self, cfg: &MarketConfig, at_ms: u64, text: String) -> bool {
        if self.history.last().is_some_and(|e| e.text == text) {
            return false;
        }
        self.history.push(MarketEntry { at_ms, text });
        let excess = self.history.len().saturating_sub(cfg.history_len.max(1));
        self.history.drain(..excess);
        true
    }

    /// Whether the books balance (see the type's invariant).
    pub fn consistent(&self) -> bool {
        self.granted_milli
            .checked_add(self.earned_milli)
            .and_then(|x| x.checked_add(self.sold_milli))
            .and_then(|x| x.checked_sub(self.bought_milli))
            == Some(self.balance_milli)
    }
}

/// Why a credit movement was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MarketError {
    #[error("balance {} credits is below the {} to pay", Credits(*.balance_milli), Credits(*.amount_milli))]
    InsufficientCredits {
        balance_milli: u64,
        amount_milli: u64,
    },
}

/// Milli-credits shown as credits ("3", "2.5", "0.125").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credits(pub u64);

impl fmt::Display for Credits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (whole, frac) = (self.0 / MILLI, self.0 % MILLI);
        if frac == 0 {
            write!(f, "{whole}")
        } else {
            let s = format!("{frac:03}");
            write!(f, "{whole}.{}", s.trim_end_matches('0'))
        }
    }
}

/// The bid rule: the limit price (milli-credits per unit) a device offers
/// for `units` units of a capability of `priority`, or `None` when it cannot
/// afford even the reserve. Willingness grows with the priority; the limit is
/// capped so the whole bid costs at most `max_spend_permille` of the balance
/// (so no bid is ever above the balance).
pub fn bid_limit(cfg: &MarketConfig, priority: u8, balance_milli: u64, units: u32) -> Option<u64> {
    if units == 0 {
        return None;
    }
    let willing = cfg.milli_per_priority.saturating_mul(u64::from(priority));
    let budget = balance_milli.saturating_mul(cfg.max_spend_permille.min(1000)) / 1000;
    let limit = willing.min(budget / u64::from(units));
    (limit >= cfg.reserve_milli && limit > 0).then_some(limit)
}

/// A buyer's whole bid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bid {
    pub device: DeviceId,
    pub units: u32,
    /// Highest price per unit (milli-credits).
    pub limit_milli: u64,
    /// Priority of the capability the units are for (second sort key).
    pub priority: u8,
}

/// A seller's offer of spare units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    pub device: DeviceId,
    pub units: u32,
    /// Lowest price per unit (milli-credits).
    pub reserve_milli: u64,
}

/// Units one seller sells to one buyer at the clearing price.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fill {
    pub buyer: DeviceId,
    pub seller: DeviceId,
    pub units: u32,
}

/// Why a bid was not filled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unfilled {
    /// Its limit is below the clearing price.
    PriceBelow {
        limit_milli: u64,
        clearing_milli: u64,
    },
    /// Its limit is at or above the clearing price, but the units left (or
    /// the pool's per-tick limit) did not cover the whole bid after the
    /// bids ahead of it in the order.
    NoUnitsLeft { clearing_milli: u64 },
    /// Nothing cleared: fewer units were offered at or below its limit
    /// than it asked for.
    NotEnoughSupply { wanted: u32, offered: u32 },
    /// Nothing cleared and it asked for more than the per-tick limit.
    OverTickLimit { wanted: u32, limit: u32 },
}

/// What one auction decided.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Clearing {
    /// `None` when nothing traded.
    pub price_milli: Option<u64>,
    pub fills: Vec<Fill>,
    pub unfilled: Vec<(DeviceId, Unfilled)>,
}

impl Clearing {
    /// Units a buyer got.
    pub fn bought(&self, buyer: &DeviceId) -> u32 {
        self.fills
            .iter()
            .filter(|f| &f.buyer == buyer)
            .map(|f| f.units)
            .sum()
    }
}

/// The clearing rule (see the module docs). Deterministic whatever the
/// order of `bids` and `asks`; bids or asks of zero units are ignored.
pub fn clear(bids: &[Bid], asks: &[Ask], max_units: u32) -> Clearing {
    let mut bids: Vec<&Bid> = bids.iter().filter(|b| b.units > 0).collect();
    bids.sort_by(|a, b| {
        b.limit_milli
            .cmp(&a.limit_milli)
            .then(b.priority.cmp(&a.priority))
            .then(a.device.cmp(&b.device))
            .then(a.units.cmp(&b.units))
    });
    let mut asks: Vec<&Ask> = asks.iter().filter(|a| a.units > 0).collect();
    asks.sort_by(|a, b| {
        a.reserve_milli
            .cmp(&b.reserve_milli)
            .then(b.units.cmp(&a.units))
            .then(a.device.cmp(&b.device))
    });
    let offered_at = |limit: u64| -> u64 {
        asks.iter()
            .filter(|a| a.reserve_milli <= limit)
            .map(|a| u64::from(a.units))
            .sum()
    };
    let mut demand = 0u64;
    let mut won = vec![false; bids.len()];
    for (i, b) in bids.iter().enumerate() {
        let d = demand + u64::from(b.units);
        if d <= offered_at(b.limit_milli) && d <= u64::from(max_units) {
            demand = d;
            won[i] = true;
        }
    }
    let winners = won.iter().filter(|w| **w).count();
    let mut out = Clearing::default();
    if winners == 0 {
        for b in &bids {
            let offered = offered_at(b.limit_milli).min(u64::from(u32::MAX)) as u32;
            let why = if b.units > max_units && offered >= b.units {
                Unfilled::OverTickLimit {
                    wanted: b.units,
                    limit: max_units,
                }
            } else {
                Unfilled::NotEnoughSupply {
                    wanted: b.units,
                    offered: offered.min(max_units),
                }
            };
            out.unfilled.push((b.device.clone(), why));
        }
        return out;
    }
    // The reserve of the dearest ask the winners need.
    let mut covered = 0u64;
    let mut marginal = 0u64;
    for a in &asks {
        if covered >= demand {
            break;
        }
        covered += u64::from(a.units);
        marginal = a.reserve_milli;
    }
    // Bids passed over before the last winner lost on size (their limit is
    // above a winner's): only the bids after it say what units are worth.
    let last_winner = won.iter().rposition(|w| *w).unwrap_or(0);
    let best_after = bids[last_winner + 1..]
        .iter()
        .map(|b| b.limit_milli)
        .max()
        .unwrap_or(0);
    let price = marginal.max(best_after);
    out.price_milli = Some(price);
    let mut left: Vec<u32> = asks.iter().map(|a| a.units).collect();
    for (b, _) in bids.iter().zip(&won).filter(|(_, w)| **w) {
        let mut need = b.units;
        for (i, a) in asks.iter().enumerate() {
            if need == 0 {
                break;
            }
            let n = left[i].min(need);
            if n == 0 {
                continue;
            }
            left[i] -= n;
            need -= n;
            out.fills.push(Fill {
                buyer: b.device.clone(),
                seller: a.device.clone(),
                units: n,
            });
        }
    }
    for (b, _) in bids.iter().zip(&won).filter(|(_, w)| !**w) {
        let why = if b.limit_milli < price {
            Unfilled::PriceBelow {
                limit_milli: b.limit_milli,
                clearing_milli: price,
            }
        } else {
            Unfilled::NoUnitsLeft {
                clearing_milli: price,
            }
        };
        out.unfilled.push((b.device.clone(), why));
    }
    out
}

impl Unfilled {
    /// The reason in words ("bid not filled: price 2 below clearing 3").
    pub fn explain(&self, units: u32, kind: ShardKind, pool: &str) -> String {
        let kind = kind_word(kind);
        match self {
            Unfilled::PriceBelow {
                limit_milli,
                clearing_milli,
            } => format!(
                "bid for {units} {kind} unit(s) not filled: price {} below clearing {} of tenant {pool}'s pool",
                Credits(*limit_milli),
                Credits(*clearing_milli)
            ),
            Unfilled::NoUnitsLeft { clearing_milli } => format!(
                "bid for {units} {kind} unit(s) not filled: at the clearing price {} of tenant {pool}'s pool too few units were left for the whole bid after the bids ahead of it (higher price, then priority, then device id)",
                Credits(*clearing_milli)
            ),
            Unfilled::NotEnoughSupply { wanted, offered } => format!(
                "bid for {wanted} {kind} unit(s) not filled: tenant {pool}'s pool offers {offered} at or below its price"
            ),
            Unfilled::OverTickLimit { wanted, limit } => format!(
                "bid for {wanted} {kind} unit(s) not filled: over the {limit} unit(s) tenant {pool}'s pool sells per tick"
            ),
        }
    }
}

/// "compute" / "data".
pub fn kind_word(kind: ShardKind) -> &'static str {
    match kind {
        ShardKind::Compute => "compute",
        ShardKind::Data => "data",
    }
}

/// One device's account for `GET /v1/credits`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreditRow {
    pub device: DeviceId,
    pub tenant: Option<String>,
    pub balance_milli: u64,
    /// The balance in credits, in words ("12.5").
    pub balance: String,
    pub earned_milli: u64,
    pub sold_milli: u64,
    pub bought_milli: u64,
    /// Market units held now (bought), per kind: compute, data.
    pub market_units: [u32; 2],
    /// Market units sold and still out, per kind.
    pub sold_units: [u32; 2],
    pub last: Option<MarketEntry>,
}
