//! Seed 002's credit market (issue 17): table tests of the clearing rule
//! and the bid rule, engine tests of each market rule (a seller never sells
//! below its need, credits are conserved, a device below the borrowing
//! reputation cannot buy, units bought are renewed rather than flapped),
//! and property tests of the invariants over random event sequences
//! (credits conserved, budgets never over-committed with loans and the
//! market, determinism, no flapping).

mod policy_common;
use policy_common::*;
use proptest::prelude::*;
use shardline_allocator_core::policy::market::{
    bid_limit, clear, Ask, Bid, CreditAccount, Credits, MarketConfig, Unfilled, MILLI,
};
use shardline_allocator_core::policy::{
    decode_device_state, Action, ComplianceKind, Engine, Event, Features, PolicyConfig,
    TransferOrigin,
};
use shardline_shared::ids::DeviceId;
use shardline_shared::msg::ShardKind;

// ------------------------------------------------------------ clearing rule

fn bid(d: &str, units: u32, limit: u64, priority: u8) -> Bid {
    Bid {
        device: dev(d),
        units,
        limit_milli: limit * MILLI,
        priority,
    }
}

fn ask(d: &str, units: u32, reserve: u64) -> Ask {
    Ask {
        device: dev(d),
        units,
        reserve_milli: reserve * MILLI,
    }
}

/// (buyer, seller, units) of every fill.
fn fills(c: &shardline_allocator_core::policy::market::Clearing) -> Vec<(String, String, u32)> {
    c.fills
        .iter()
        .map(|f| (f.buyer.to_string(), f.seller.to_string(), f.units))
        .collect()
}

struct Case {
    name: &'static str,
    bids: Vec<Bid>,
    asks: Vec<Ask>,
    max_units: u32,
    price: Option<u64>,
    fills: Vec<(&'static str, &'static str, u32)>,
    unfilled: Vec<(&'static str, Unfilled)>,
}

#[test]
fn clearing_rule_table() {
    let m = MILLI;
    let cases = vec![
        Case {
            name: "price is the best bid left out, above the reserve",
            bids: vec![
                bid("a", 2, 5, 50),
                bid("b", 1, 4, 50),
                bid("c", 2, 3, 50),
                bid("d", 1, 2, 50),
            ],
            asks: vec![ask("s", 3, 1)],
            max_units: 8,
            price: Some(3 * m),
            fills: vec![("a", "s", 2), ("b", "s", 1)],
            unfilled: vec![
                (
                    "c",
                    Unfilled::NoUnitsLeft {
                        clearing_milli: 3 * m,
                    },
                ),
                (
                    "d",
                    Unfilled::PriceBelow {
                        limit_milli: 2 * m,
                        clearing_milli: 3 * m,
                    },
                ),
            ],
        },
        Case {
            name: "everything filled: the dearest ask used sets the price",
            bids: vec![bid("a", 3, 5, 50)],
            asks: vec![ask("s1", 2, 1), ask("s2", 2, 2)],
            max_units: 8,
            price: Some(2 * m),
            fills: vec![("a", "s1", 2), ("a", "s2", 1)],
            unfilled: vec![],
        },
        Case {
            name: "asks above a bid's limit do not serve it",
            bids: vec![bid("a", 2, 2, 50)],
            asks: vec![ask("s1", 1, 1), ask("s2", 5, 3)],
            max_units: 8,
            price: None,
            fills: vec![],
            unfilled: vec![(
                "a",
                Unfilled::NotEnoughSupply {
                    wanted: 2,
                    offered: 1,
                },
            )],
        },
        Case {
            name: "equal limits: the higher priority first",
            bids: vec![bid("a", 1, 3, 40), bid("b", 1, 3, 60)],
            asks: vec![ask("s", 1, 1)],
            max_units: 8,
            price: Some(3 * m),
            fills: vec![("b", "s", 1)],
            unfilled: vec![(
                "a",
                Unfilled::NoUnitsLeft {
                    clearing_milli: 3 * m,
                },
            )],
        },
        Case {
            name: "equal limits and priorities: the lower device id first",
            bids: vec![bid("z", 1, 3, 50), bid("a", 1, 3, 50)],
            asks: vec![ask("s", 1, 1)],
            max_units: 8,
            price: Some(3 * m),
            fills: vec![("a", "s", 1)],
            unfilled: vec![(
                "z",
                Unfilled::NoUnitsLeft {
                    clearing_milli: 3 * m,
                },
            )],
        },
        Case {
            name: "a bid too big for what is left is passed over, not blocking",
            bids: vec![bid("big", 5, 5, 50), bid("small", 1, 3, 50)],
            asks: vec![ask("s", 3, 1)],
            max_units: 8,
            price: Some(m),
            fills: vec![("small", "s", 1)],
            unfilled: vec![("big", Unfilled::NoUnitsLeft { clearing_milli: m })],
        },
        Case {
            name: "the per-tick limit caps what sells",
            bids: vec![bid("a", 2, 4, 50), bid("b", 2, 3, 50)],
            asks: vec![ask("s", 10, 1)],
            max_units: 3,
            price: Some(3 * m),
            fills: vec![("a", "s", 2)],
            unfilled: vec![(
                "b",
                Unfilled::NoUnitsLeft {
                    clearing_milli: 3 * m,
                },
            )],
        },
        Case {
            name: "sellers with the most units are used first, ties by id",
            bids: vec![bid("a", 3, 4, 50)],
            asks: vec![ask("s2", 1, 1), ask("s3", 2, 1), ask("s1", 2, 1)],
            max_units: 8,
            price: Some(m),
            fills: vec![("a", "s1", 2), ("a", "s3", 1)],
            unfilled: vec![],
        },
        Case {
            name: "no asks",
            bids: vec![bid("a", 1, 4, 50)],
            asks: vec![],
            max_units: 8,
            price: None,
            fills: vec![],
            unfilled: vec![(
                "a",
                Unfilled::NotEnoughSupply {
                    wanted: 1,
                    offered: 0,
                },
            )],
        },
        Case {
            name: "zero-unit bids and asks are ignored",
            bids: vec![bid("a", 0, 9, 50), bid("b", 1, 2, 50)],
            asks: vec![ask("s0", 0, 1), ask("s", 1, 1)],
            max_units: 8,
            price: Some(m),
            fills: vec![("b", "s", 1)],
            unfilled: vec![],
        },
    ];
    for c in cases {
        let got = clear(&c.bids, &c.asks, c.max_units);
        assert_eq!(got.price_milli, c.price, "{}: price", c.name);
        let want: Vec<(String, String, u32)> = c
            .fills
            .iter()
            .map(|(b, s, u)| (b.to_string(), s.to_string(), *u))
            .collect();
        assert_eq!(fills(&got), want, "{}: fills", c.name);
        let want_unfilled: Vec<(DeviceId, Unfilled)> =
            c.unfilled.into_iter().map(|(d, u)| (dev(d), u)).collect();
        assert_eq!(got.unfilled, want_unfilled, "{}: unfilled", c.name);
        // Every winner pays at most its limit, every used seller gets at
        // least its reserve.
        if let Some(p) = got.price_milli {
            for f in &got.fills {
                let b = c.bids.iter().find(|b| b.device == f.buyer).unwrap();
                let a = c.asks.iter().find(|a| a.device == f.seller).unwrap();
                assert!(p <= b.limit_milli && p >= a.reserve_milli, "{}", c.name);
            }
        }
        // The order of the input does not matter.
        let mut rb = c.bids.clone();
        rb.reverse();
        let mut ra = c.asks.clone();
        ra.reverse();
        let again = clear(&rb, &ra, c.max_units);
        assert_eq!(again, got, "{}: order of input", c.name);
    }
}

#[test]
fn unfilled_bids_are_explained_in_words() {
    let why = Unfilled::PriceBelow {
        limit_milli: 2 * MILLI,
        clearing_milli: 3 * MILLI,
    };
    assert_eq!(
        why.explain(1, ShardKind::Compute, "t1"),
        "bid for 1 compute unit(s) not filled: price 2 below clearing 3 of tenant t1's pool"
    );
    assert_eq!(Credits(2500).to_string(), "2.5");
    assert_eq!(Credits(125).to_string(), "0.125");
    assert_eq!(Credits(0).to_string(), "0");
}

#[test]
fn bid_rule_table_never_above_the_balance() {
    let cfg = MarketConfig::default(); // 40 milli per priority point, half the balance
                                       // (priority, balance, units, expected limit)
    let cases: [(u8, u64, u32, Option<u64>); 7] = [
        (80, 20_000, 1, Some(3_200)), // willingness binds
        (80, 4_000, 1, Some(2_000)),  // half the balance binds
        (80, 4_000, 2, Some(1_000)),  // spread over the units
        (80, 3_000, 2, None),         // 750 per unit is below the reserve
        (10, 20_000, 1, None),        // priority 10 is worth 400 < reserve
        (80, 0, 1, None),
        (80, 20_000, 0, None),
    ];
    for (priority, balance, units, want) in cases {
        let got = bid_limit(&cfg, priority, balance, units);
        assert_eq!(
            got, want,
            "priority {priority} balance {balance} units {units}"
        );
        if let Some(l) = got {
            assert!(l * u64::from(units) <= balance, "bid above the balance");
            assert!(l >= cfg.reserve_milli);
        }
    }
}

#[test]
fn payments_move_credits_exactly_and_never_past_the_balance() {
    let cfg = MarketConfig::default();
    let (mut a, mut b) = (CreditAccount::default(), CreditAccount::default());
    a.open(&cfg, 0);
    b.open(&cfg, 0);
    assert!(!a.open(&cfg, 5), "opened once");
    a.pay(&mut b, 7_500).unwrap();
    assert_eq!((a.balance_milli, b.balance_milli), (12_500, 27_500));
    assert!(a.pay(&mut b, 12_501).is_err());
    assert_eq!(a.balance_milli, 12_500, "a refused payment moves nothing");
    // 90 s of one unit: one whole unit-minute is paid, 30 s carried over.
    assert_eq!(a.accrue(&cfg, 90_000), cfg.earn_milli_per_unit_minute);
    assert_eq!(a.accrue(&cfg, 30_000), cfg.earn_milli_per_unit_minute);
    assert_eq!(a.lent_unit_ms, 0);
    assert!(a.consistent() && b.consistent());
    assert_eq!(a.bought_milli, b.sold_milli);
}

// ------------------------------------------------------------ engine rules

/// Market on, free borrowing and shifting off, so every unit moves through
/// the market.
fn market_only() -> PolicyConfig {
    PolicyConfig {
        features: Features {
            borrowing: false,
            shifting: false,
            prediction: false,
            ..Features::MARKET
        },
        ..PolicyConfig::default()
    }
}

/// Tenant `t`: `seller` (tier four: 4 data units) runs vpn (2 data
/// units: 2 spare); `buyers` (tier tight: 3 data units) want vpn + qos (4).
fn market_setup(cfg: PolicyConfig, buyers: &[&str]) -> (Engine, DeviceId, Vec<DeviceId>) {
    let mut e = engine_with(cfg);
    let s = dev("seller");
    enroll(&mut e, 0, &s, "four", Some("t"));
    send(&mut e, 0, &s, 1, vec![secure(100_000)]);
    let bs: Vec<DeviceId> = buyers.iter().map(|b| dev(b)).collect();
    for b in &bs {
        enroll(&mut e, 0, b, "tight", Some("t"));
    }
    (e, s, bs)
}

fn want_both(e: &mut Engine, now: u64, b: &DeviceId, seq: u64) -> Vec<Action> {
    send(e, now, b, seq, vec![secure(100_000), calls(100_000)])
}

fn balance(e: &Engine, d: &DeviceId) -> u64 {
    e.device(d).unwrap().credits.balance_milli
}

fn last_note(e: &Engine, d: &DeviceId) -> String {
    e.device(d)
        .unwrap()
        .credits
        .history
        .last()
        .map(|h| h.text.clone())
        .unwrap_or_default()
}

#[test]
fn a_short_device_buys_a_peers_spare_unit_at_the_clearing_price() {
    let (mut e, s, bs) = market_setup(market_only(), &["buyer"]);
    let b = &bs[0];
    let now = MIN;
    want_both(&mut e, now, b, 1);
    assert!(
        !profile(&e, b).contains(&"qos-shaper".to_owned()),
        "nothing to buy before the tick"
    );
    let out = e.handle(now, Event::Tick);
    let v = e.device(b).unwrap();
    assert_eq!(v.borrowed.len(), 1, "{v:?}");
    let t = &v.borrowed[0];
    assert_eq!(
        (t.from.as_str(), t.kind, t.units),
        ("seller", ShardKind::Data, 1)
    );
    // One bid, supply left over: the price is the sellers' reserve.
    assert_eq!(t.origin, TransferOrigin::Market { price_milli: MILLI });
    assert_eq!(t.expires_at_ms - now, MarketConfig::default().lease_ms);
    assert!(
        activated(&ops_for(&out, b)).contains(&"qos-shaper".to_owned()),
        "the unit bought is used at once: {out:?}"
    );
    let init = MarketConfig::default().initial_milli;
    assert_eq!(balance(&e, b), init - MILLI);
    assert_eq!(balance(&e, &s), init + MILLI);
    assert_eq!(
        last_note(&e, b),
        format!(
            "bought 1 data unit(s) from seller at 1 credits/unit: clearing price of tenant t's pool at tick {now}"
        )
    );
    assert!(last_note(&e, &s).starts_with("sold 1 data unit(s) to buyer at 1 credits/unit"));
    // The seller's view shows the sale; `credits` lists both accounts.
    assert_eq!(e.device(&s).unwrap().lent.len(), 1);
    let rows = e.credits(Some("t"));
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].device.as_str(), "buyer");
    assert_eq!(rows[0].market_units, [0, 1]);
    assert_eq!(rows[1].sold_units, [0, 1]);
    assert!(e.credits(Some("other")).is_empty());
}

#[test]
fn a_seller_never_sells_below_its_need_and_ties_go_by_device_id() {
    // Three buyers short of one data unit each; the seller spares two.
    let (mut e, s, bs) = market_setup(market_only(), &["b1", "b2", "b3"]);
    for (i, b) in bs.iter().enumerate() {
        want_both(&mut e, MIN, b, i as u64 + 1);
    }
    e.handle(MIN, Event::Tick);
    let got: Vec<usize> = bs
        .iter()
        .map(|b| e.device(b).unwrap().borrowed.len())
        .collect();
    assert_eq!(got, vec![1, 1, 0], "equal bids: b1 and b2 by device id");
    let sv = e.device(&s).unwrap();
    let lent: u32 = sv.lent.iter().map(|t| t.units).sum();
    assert_eq!(lent, 2);
    assert!(
        sv.budget_data_units >= 2,
        "the seller keeps its vpn's 2 units"
    );
    assert_eq!(profile(&e, &s).len(), 3, "the seller's own shards stay");
    // Three equal bids for two units: the bid left out sets the price, so
    // the winners pay their own limit.
    let TransferOrigin::Market { price_milli } = e.device(&bs[0]).unwrap().borrowed[0].origin
    else {
        panic!("a market transfer")
    };
    let limit = bid_limit(
        &MarketConfig::default(),
        qos_priority(&e),
        MarketConfig::default().initial_milli,
        1,
    )
    .unwrap();
    assert_eq!(price_milli, limit);
    assert!(
        last_note(&e, &bs[2]).contains("not filled"),
        "{}",
        last_note(&e, &bs[2])
    );
    // The seller's demand rises: it takes its units back (a seller never
    // stays below its need), the buyers lose them.
    send(
        &mut e,
        2 * MIN,
        &s,
        2,
        vec![secure(100_000), calls(100_000)],
    );
    assert!(e.device(&s).unwrap().lent.is_empty());
    assert_eq!(profile(&e, &s).len(), 5);
}

fn qos_priority(e: &Engine) -> u8 {
    let p = e.catalog().capabilities["qos"].priority;
    p.min(e.agreements().tiers["tight"].max_priority)
}

#[test]
fn credits_are_conserved_buyers_pay_what_sellers_earn() {
    let (mut e, s, bs) = market_setup(market_only(), &["b1", "b2"]);
    for (i, b) in bs.iter().enumerate() {
        want_both(&mut e, MIN, b, i as u64 + 1);
    }
    e.handle(MIN, Event::Tick);
    let rows = e.credits(None);
    let paid: u64 = rows.iter().map(|r| r.bought_milli).sum();
    let got: u64 = rows.iter().map(|r| r.sold_milli).sum();
    assert!(paid > 0);
    assert_eq!(paid, got);
    let total: u64 = rows.iter().map(|r| r.balance_milli).sum();
    assert_eq!(total, 3 * MarketConfig::default().initial_milli);
    for d in bs.iter().chain([&s]) {
        assert!(e.device(d).unwrap().credits.consistent());
    }
}

#[test]
fn a_device_below_the_borrow_reputation_cannot_buy() {
    let (mut e, _s, bs) = market_setup(market_only(), &["buyer"]);
    let b = &bs[0];
    e.handle(
        0,
        Event::ComplianceEvent {
            device: b.clone(),
            kind: ComplianceKind::BadReportSignature,
        },
    );
    assert!(e.device(b).unwrap().reputation < PolicyConfig::default().borrow_min_reputation);
    want_both(&mut e, MIN, b, 1);
    e.handle(MIN, Event::Tick);
    assert!(e.device(b).unwrap().borrowed.is_empty());
    let note = last_note(&e, b);
    assert!(
        note.starts_with("cannot buy") && note.contains("below the borrowing threshold"),
        "{note}"
    );
    assert_eq!(balance(&e, b), MarketConfig::default().initial_milli);
}

#[test]
fn no_bid_above_the_balance() {
    let mut cfg = market_only();
    cfg.market.initial_milli = 500; // below the 1-credit reserve
    let (mut e, _s, bs) = market_setup(cfg, &["buyer"]);
    let b = &bs[0];
    want_both(&mut e, MIN, b, 1);
    e.handle(MIN, Event::Tick);
    assert!(e.device(b).unwrap().borrowed.is_empty());
    assert_eq!(balance(&e, b), 500);
    assert!(
        last_note(&e, b).starts_with("cannot bid for 1 data unit(s) for qos: balance 0.5"),
        "{}",
        last_note(&e, b)
    );
}

#[test]
fn lending_earns_credits_per_unit_minute() {
    // Borrowing on, the market on: the lender earns for the unit it lends.
    let cfg = PolicyConfig {
        features: Features {
            shifting: false,
            prediction: false,
            ..Features::MARKET
        },
        ..PolicyConfig::default()
    };
    let (mut e, s, bs) = market_setup(cfg, &["buyer"]);
    let b = &bs[0];
    e.handle(0, Event::Tick); // accounts open
    want_both(&mut e, MIN, b, 1);
    let v = e.device(b).unwrap();
    assert_eq!(v.borrowed.len(), 1);
    assert_eq!(
        v.borrowed[0].origin,
        TransferOrigin::Borrow,
        "free loan first"
    );
    e.handle(31 * MIN, Event::Tick);
    let c = e.device(&s).unwrap().credits;
    assert_eq!(
        c.earned_milli,
        30 * MarketConfig::default().earn_milli_per_unit_minute,
        "{c:?}"
    );
    assert!(c.consistent());
    assert_eq!(balance(&e, b), MarketConfig::default().initial_milli);
}

#[test]
fn units_still_used_are_renewed_at_their_price_not_flapped() {
    let (mut e, s, bs) = market_setup(market_only(), &["buyer"]);
    let b = &bs[0];
    want_both(&mut e, MIN, b, 1);
    e.handle(MIN, Event::Tick);
    let lease = MarketConfig::default().lease_ms;
    let mut now = MIN;
    let mut seq = 1;
    while now < MIN + 3 * lease {
        now += 5 * MIN;
        seq += 1;
        let out = want_both(&mut e, now, b, seq);
        assert!(deactivated(&ops_for(&out, b)).is_empty(), "flap at {now}");
        let out = e.handle(now, Event::Tick);
        assert!(
            deactivated(&ops_for(&out, b)).is_empty(),
            "flap at {now}: {out:?}"
        );
        assert_eq!(e.device(b).unwrap().borrowed.len(), 1, "at {now}");
    }
    assert_eq!(e.device(b).unwrap().flaps, 0);
    // Bought once and renewed three times, at the first price.
    let init = MarketConfig::default().initial_milli;
    assert_eq!(balance(&e, b), init - 4 * MILLI);
    assert_eq!(balance(&e, &s), init + 4 * MILLI);
    assert!(
        last_note(&e, b).starts_with("renewed 1 data unit(s) from seller at 1 credits/unit"),
        "{}",
        last_note(&e, b)
    );
    // The need goes: the units return at the end of their lease, unpaid.
    let expiry = e.device(b).unwrap().borrowed[0].expires_at_ms;
    send(&mut e, now + MIN, b, seq + 1, vec![secure(100_000)]);
    let mut t = now + MIN;
    while t <= expiry + MIN {
        t += 5 * MIN;
        e.handle(t, Event::Tick);
    }
    let v = e.device(b).unwrap();
    assert!(v.borrowed.is_empty(), "{v:?}");
    assert_eq!(v.credits.balance_milli, init - 4 * MILLI);
    assert!(
        v.credits.history.iter().any(|h| h
            .text
            .contains("returned at the end of their lease: no longer needed")),
        "{:?}",
        v.credits.history
    );
}

#[test]
fn accounts_and_market_transfers_survive_the_state_codec() {
    let (mut e, _s, bs) = market_setup(market_only(), &["buyer"]);
    let b = &bs[0];
    want_both(&mut e, MIN, b, 1);
    e.handle(MIN, Event::Tick);
    let st = e.device_state(b).unwrap().clone();
    assert!(st.credits.opened && !st.credits.history.is_empty());
    let bytes = postcard::to_stdvec(&st).unwrap();
    assert_eq!(decode_device_state(&bytes).unwrap(), st);
}

#[test]
fn the_market_is_off_in_full() {
    const { assert!(!Features::FULL.market && Features::MARKET.market) };
    let mut cfg = market_only();
    cfg.features.market = false;
    let (mut e, _s, bs) = market_setup(cfg, &["buyer"]);
    want_both(&mut e, MIN, &bs[0], 1);
    e.handle(MIN, Event::Tick);
    let v = e.device(&bs[0]).unwrap();
    assert!(v.borrowed.is_empty() && !v.credits.opened);
}

#[test]
fn bad_market_config_is_refused() {
    let mut cfg = PolicyConfig::default();
    cfg.market.lease_ms = 0;
    assert_eq!(cfg.check().unwrap_err().0, "market.lease_ms");
    let mut cfg = PolicyConfig::default();
    cfg.market.max_spend_permille = 1001;
    assert!(cfg.check().is_err());
    let parsed: Result<PolicyConfig, _> = toml::from_str("[market]\nbogus = 1\n");
    assert!(parsed.is_err(), "unknown market keys are refused");
    let parsed: PolicyConfig =
        toml::from_str("[features]\nmarket = true\n[market]\ninitial_milli = 5\n").unwrap();
    assert!(parsed.features.market);
    assert_eq!(parsed.market.initial_milli, 5);
}

// ------------------------------------------------------------ properties

const FLEET: [(&str, &str); 6] = [
    ("d0", "tight"),
    ("d1", "tight"),
    ("d2", "four"),
    ("d3", "roomy"),
    ("d4", "basic"),
    ("d5", "tight"),
];

#[derive(Debug, Clone)]
enum Step {
    Report { dev: usize, enc: bool, lat: bool },
    Tick { advance_min: u64 },
    Compliance { dev: usize },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        // Penalties are rare: below the borrowing reputation nobody buys.
        12 => (0..FLEET.len(), any::<bool>(), any::<bool>())
            .prop_map(|(dev, enc, lat)| Step::Report { dev, enc, lat }),
        8 => (1u64..20).prop_map(|advance_min| Step::Tick { advance_min }),
        1 => (0..FLEET.len()).prop_map(|dev| Step::Compliance { dev }),
    ]
}

/// Runs the steps with loans, shifts and the market all on, checking the
/// invariants after every event when `check`; returns every action and
/// the final accounts.
fn run(steps: &[Step], borrowing: bool, check: bool) -> (Vec<Vec<Action>>, Vec<CreditAccount>) {
    let cfg = PolicyConfig {
        features: Features {
            borrowing,
            ..Features::MARKET
        },
        ..PolicyConfig::default()
    };
    let mut e = engine_with(cfg);
    let ids: Vec<DeviceId> = FLEET.iter().map(|f| dev(f.0)).collect();
    for (i, (_, tier)) in FLEET.iter().enumerate() {
        enroll(&mut e, 0, &ids[i], tier, Some("t"));
    }
    let mut now = 0;
    let mut seqs = [0u64; FLEET.len()];
    let mut log = Vec::new();
    for s in steps {
        let event = match *s {
            Step::Report { dev, enc, lat } => {
                seqs[dev] += 1;
                let mut classes = Vec::new();
                if enc {
                    classes.push(secure(100_000));
                }
                if lat {
                    classes.push(calls(100_000));
                }
                let st = healthy_statuses(&e, &ids[dev]);
                Event::Report(report(&ids[dev], seqs[dev], classes, st, true))
            }
            Step::Tick { advance_min } => {
                now += advance_min * MIN;
                Event::Tick
            }
            Step::Compliance { dev } => Event::ComplianceEvent {
                device: ids[dev].clone(),
                kind: ComplianceKind::BadReportSignature,
            },
        };
        let out = e.handle(now, event);
        if check {
            check_invariants(&e);
        }
        log.push(out);
    }
    let accounts: Vec<CreditAccount> = ids
        .iter()
        .map(|d| e.device(d).unwrap().credits.clone())
        .collect();
    (log, accounts)
}

fn check_invariants(e: &Engine) {
    let mut granted_earned = 0u64;
    let mut balances = 0u64;
    let (mut paid, mut got) = (0u64, 0u64);
    // Units in use and tier budgets of the (single) pool.
    let (mut pool_used, mut pool_budget) = ([0u64; 2], [0u64; 2]);
    for s in e.devices() {
        let tier = &e.agreements().tiers[&s.tier];
        pool_used[0] += u64::from(s.compute_units);
        pool_used[1] += u64::from(s.data_units);
        pool_budget[0] += u64::from(tier.budget(ShardKind::Compute));
        pool_budget[1] += u64::from(tier.budget(ShardKind::Data));
        let v = e.device(&s.device).unwrap();
        // Leases never exceed the effective budget (quota + borrowed −
        // lent, market transfers included).
        assert!(
            s.compute_units <= v.budget_compute_units && s.data_units <= v.budget_data_units,
            "{}: used {}/{} over budget {}/{}: {v:?}",
            s.device,
            s.compute_units,
            s.data_units,
            v.budget_compute_units,
            v.budget_data_units
        );
        let c = &v.credits;
        assert!(c.consistent(), "{}: books do not balance: {c:?}", s.device);
        granted_earned += c.granted_milli + c.earned_milli;
        balances += c.balance_milli;
        paid += c.bought_milli;
        got += c.sold_milli;
        // Both sides hold the same market transfers.
        for t in &v.borrowed {
            let seller = e.device(&t.from).unwrap();
            assert!(seller.lent.contains(t) || matches!(t.origin, TransferOrigin::Shift { .. }));
        }
    }
    assert!(
        pool_used[0] <= pool_budget[0] && pool_used[1] <= pool_budget[1],
        "pool uses {pool_used:?} over its tier budgets {pool_budget:?}"
    );
    assert_eq!(paid, got, "buyers paid what sellers earned");
    assert_eq!(
        balances, granted_earned,
        "credits are only minted by grants and lending"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn credits_conserved_and_budgets_never_over_committed(
        steps in prop::collection::vec(step(), 1..120),
        borrowing in prop::bool::weighted(0.25),
    ) {
        run(&steps, borrowing, true);
    }

    #[test]
    fn same_events_same_clock_same_market(
        steps in prop::collection::vec(step(), 1..80),
        borrowing in any::<bool>(),
    ) {
        let a = run(&steps, borrowing, false);
        let b = run(&steps, borrowing, false);
        prop_assert_eq!(a, b);
    }

    /// A buyer whose calls come and go within the hysteresis window keeps
    /// its market unit through renewals: no deactivation after the first
    /// activation, however many leases pass.
    #[test]
    fn no_flapping_with_market_units(
        pattern in prop::collection::vec(any::<bool>(), 10..80),
        step_min in 1u64..5,
    ) {
        let hold = PolicyConfig::default().hysteresis_ms;
        let max_gap = (hold / (step_min * MIN)).saturating_sub(1) as usize;
        let mut gap = 0;
        let pattern: Vec<bool> = pattern.into_iter().map(|p| {
            if p || gap >= max_gap { gap = 0; true } else { gap += 1; false }
        }).collect();
        let (mut e, _s, bs) = market_setup(market_only(), &["buyer"]);
        let d = &bs[0];
        let mut active = false;
        for (i, on) in pattern.iter().enumerate() {
            let now = i as u64 * step_min * MIN;
            let mut classes = vec![secure(100_000)];
            if *on {
                classes.push(calls(100_000));
            }
            let out = send(&mut e, now, d, i as u64 + 1, classes);
            let ops = ops_for(&out, d);
            if active {
                prop_assert!(!deactivated(&ops).iter().any(|s| s.starts_with("qos")), "flap at report {}: {:?}", i, ops);
            }
            let out = e.handle(now, Event::Tick);
            let ops2 = ops_for(&out, d);
            if active {
                prop_assert!(!deactivated(&ops2).iter().any(|s| s.starts_with("qos")), "flap at tick {}: {:?}", i, ops2);
            }
            active |= activated(&ops).iter().chain(activated(&ops2).iter()).any(|s| s.starts_with("qos"));
        }
        prop_assert!(active, "the buyer got its qos through the market");
        prop_assert_eq!(e.device(d).unwrap().flaps, 0);
    }
}

// ------------------------------------------------- recall, keep-running

/// Two sellers with 2 spare data units each; one buyer short of one.
fn two_sellers() -> (Engine, DeviceId, DeviceId, DeviceId) {
    let (mut e, s1, bs) = market_setup(market_only(), &["buyer"]);
    let s2 = dev("seller2");
    enroll(&mut e, 0, &s2, "four", Some("t"));
    send(&mut e, 0, &s2, 1, vec![secure(100_000)]);
    let b = bs[0].clone();
    want_both(&mut e, MIN, &b, 1);
    e.handle(MIN, Event::Tick);
    assert_eq!(
        e.device(&b).unwrap().borrowed[0].from.as_str(),
        "seller",
        "equal offers: the lower device id sells"
    );
    (e, s1, s2, b)
}

#[test]
fn a_seller_taking_units_back_hands_them_to_another_seller_without_a_flap() {
    let (mut e, s1, s2, b) = two_sellers();
    let lease = MarketConfig::default().lease_ms;
    // Half-way through the lease, the first seller needs its units.
    let now = MIN + lease / 2;
    want_both(&mut e, now - MIN, &b, 2); // the buyer's demand holds
    let out = send(&mut e, now, &s1, 2, vec![secure(100_000), calls(100_000)]);
    assert!(
        deactivated(&ops_for(&out, &b)).is_empty(),
        "the buyer keeps its shards: {out:?}"
    );
    let v = e.device(&b).unwrap();
    assert_eq!(v.borrowed.len(), 1);
    assert_eq!(v.borrowed[0].from, s2, "{v:?}");
    assert_eq!(v.borrowed[0].expires_at_ms, MIN + lease, "same expiry");
    assert!(e.device(&s1).unwrap().lent.is_empty());
    // The first seller passed half of the 1-credit sale to the second.
    let init = MarketConfig::default().initial_milli;
    assert_eq!(balance(&e, &s1), init + MILLI / 2);
    assert_eq!(balance(&e, &s2), init + MILLI / 2);
    assert_eq!(balance(&e, &b), init - MILLI);
    assert!(
        last_note(&e, &b).contains("now come from seller2"),
        "{}",
        last_note(&e, &b)
    );
}

#[test]
fn with_no_other_seller_the_buyer_is_refunded_the_rest_of_the_lease() {
    let (mut e, s, bs) = market_setup(market_only(), &["buyer"]);
    let b = &bs[0];
    want_both(&mut e, MIN, b, 1);
    e.handle(MIN, Event::Tick);
    let lease = MarketConfig::default().lease_ms;
    send(
        &mut e,
        MIN + lease / 4,
        &s,
        2,
        vec![secure(100_000), calls(100_000)],
    );
    assert!(e.device(b).unwrap().borrowed.is_empty());
    let init = MarketConfig::default().initial_milli;
    assert_eq!(balance(&e, b), init - MILLI / 4, "three quarters refunded");
    assert_eq!(balance(&e, &s), init + MILLI / 4);
    assert!(
        last_note(&e, b).contains("returned early"),
        "{}",
        last_note(&e, b)
    );
}

#[test]
fn a_running_capability_short_of_units_is_kept_by_buying_at_once() {
    let (mut e, _s, bs) = market_setup(market_only(), &["buyer"]);
    let b = &bs[0];
    // Calls only: qos runs within the buyer's own 3 data units.
    send(&mut e, MIN, b, 1, vec![calls(100_000)]);
    e.handle(MIN, Event::Tick);
    assert!(profile(&e, b).contains(&"qos-shaper".to_owned()));
    // Encrypted traffic arrives: vpn (priority 70) outranks qos (60), so
    // qos would stop; it buys the unit at once instead of waiting for the
    // next run (stop now, start then: a flap).
    let out = want_both(&mut e, 2 * MIN, b, 2);
    let ops = ops_for(&out, b);
    assert!(deactivated(&ops).is_empty(), "{ops:?}");
    let v = e.device(b).unwrap();
    assert_eq!(v.borrowed.len(), 1, "{v:?}");
    assert!(
        last_note(&e, b).contains("to keep qos running"),
        "{}",
        last_note(&e, b)
    );
    assert!(profile(&e, b).iter().any(|s| s.starts_with("vpn")));
    assert_eq!(e.device(b).unwrap().flaps, 0);
}

#[test]
fn a_seller_that_leaves_hands_its_sold_units_to_another_seller() {
    let (mut e, s1, s2, b) = two_sellers();
    want_both(&mut e, 5 * MIN, &b, 2);
    let out = e.handle(6 * MIN, Event::Unenrolled { device: s1.clone() });
    assert!(deactivated(&ops_for(&out, &b)).is_empty(), "{out:?}");
    let v = e.device(&b).unwrap();
    assert_eq!(v.borrowed.len(), 1, "{v:?}");
    assert_eq!(v.borrowed[0].from, s2);
    assert_eq!(e.device(&s2).unwrap().lent.len(), 1);
}
