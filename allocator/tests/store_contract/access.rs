//! The store contract for operator tokens and the audit log (issue 20):
//! tokens round-trip by id and are overwritten in place (revocation), audit
//! ids grow, entries are rewritten in place, queries filter and page newest
//! first, and every append keeps the log inside its bounds (count and age)
//! without ever dropping the entry just written.

use shardline_allocator::service::access::{OperatorToken, Role};
use shardline_allocator::service::audit::{AuditEntry, AuditLimits, AuditQuery, Outcome};
use shardline_allocator::service::store::Store;

fn token(id: &str, role: Role) -> OperatorToken {
    OperatorToken {
        id: id.into(),
        name: format!("n-{id}"),
        role,
        hash: [7; 32],
        created_ms: 10,
        created_by: "token-file".into(),
        expires_at_ms: Some(99),
        revoked_at_ms: None,
    }
}

fn entry(at_ms: u64, actor: &str, target: &str) -> AuditEntry {
    AuditEntry {
        at_ms,
        actor: actor.into(),
        role: "operator".into(),
        token_id: "0123456789abcdef".into(),
        action: "pin".into(),
        target: target.into(),
        detail: "shard=x".into(),
        outcome: Outcome::Pending,
        status: 0,
        message: String::new(),
    }
}

fn all(limit: usize) -> AuditQuery {
    AuditQuery {
        limit,
        ..AuditQuery::default()
    }
}

const WIDE: AuditLimits = AuditLimits {
    min_at_ms: 0,
    max_entries: 1000,
};

pub fn check(store: &dyn Store) {
    // Operator tokens.
    assert_eq!(store.load_operator_token("aaaaaaaaaaaaaaaa").unwrap(), None);
    assert!(store.load_operator_tokens().unwrap().is_empty());
    let a = token("aaaaaaaaaaaaaaaa", Role::Viewer);
    let b = token("bbbbbbbbbbbbbbbb", Role::Admin);
    store.put_operator_token(&b).unwrap();
    store.put_operator_token(&a).unwrap();
    assert_eq!(store.load_operator_token(&a.id).unwrap().as_ref(), Some(&a));
    let mut revoked = a.clone();
    revoked.revoked_at_ms = Some(50);
    store.put_operator_token(&revoked).unwrap();
    assert_eq!(
        store.load_operator_tokens().unwrap(),
        vec![revoked.clone(), b.clone()],
        "by id order, the revocation in place"
    );

    // Audit: ids grow, rewrites land in place, queries are newest first.
    assert!(store.load_audit(&all(10)).unwrap().is_empty());
    let id1 = store
        .append_audit(&entry(100, "alice", "d1"), &WIDE)
        .unwrap();
    let id2 = store.append_audit(&entry(200, "bob", "d2"), &WIDE).unwrap();
    let id3 = store
        .append_audit(&entry(300, "alice", "d2"), &WIDE)
        .unwrap();
    assert!(id1 < id2 && id2 < id3);
    let mut done = entry(200, "bob", "d2");
    done.outcome = Outcome::Refused;
    done.status = 403;
    done.message = "this needs the operator role".into();
    store.put_audit(id2, &done).unwrap();
    let got = store.load_audit(&all(10)).unwrap();
    assert_eq!(
        got.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![id3, id2, id1]
    );
    assert_eq!(got[1].entry, done);
    let q = |actor: Option<&str>, target: Option<&str>, before: Option<u64>, limit| {
        store
            .load_audit(&AuditQuery {
                limit,
                before_ms: before,
                actor: actor.map(str::to_owned),
                target: target.map(str::to_owned),
            })
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(q(Some("alice"), None, None, 10), vec![id3, id1]);
    assert_eq!(q(None, Some("d2"), None, 10), vec![id3, id2]);
    assert_eq!(q(None, None, Some(300), 10), vec![id2, id1]);
    assert_eq!(q(Some("alice"), Some("d2"), None, 10), vec![id3]);
    assert_eq!(
        q(None, None, None, 2),
        vec![id3, id2],
        "a page of the newest"
    );

    // Bounds: at most `max_entries`, the oldest dropped first.
    let three = AuditLimits {
        min_at_ms: 0,
        max_entries: 3,
    };
    let id4 = store
        .append_audit(&entry(400, "carol", "d3"), &three)
        .unwrap();
    let id5 = store
        .append_audit(&entry(500, "carol", "d3"), &three)
        .unwrap();
    assert_eq!(q(None, None, None, 10), vec![id5, id4, id3]);
    // A rewrite of a dropped entry does not bring it back.
    store.put_audit(id1, &entry(100, "alice", "d1")).unwrap();
    assert_eq!(q(None, None, None, 10), vec![id5, id4, id3]);
    // And by age: entries before `min_at_ms` go; the new one stays even
    // if it is itself old (a clock step back).
    let id6 = store
        .append_audit(
            &entry(450, "dave", "d4"),
            &AuditLimits {
                min_at_ms: 450,
                max_entries: 1000,
            },
        )
        .unwrap();
    assert_eq!(q(None, None, None, 10), vec![id6, id5]);
    assert!(id6 > id5, "ids keep growing after pruning");
}
