//! Who may use the admin API, and as what: the roles (viewer < operator <
//! admin), operator tokens (`slo_<id>_<secret-hex>`, stored only as the
//! SHA-256 of their secret), the bootstrap token file (always admin), and
//! the route → role table.
//!
//! A request is authenticated before anything else about it is looked at
//! (`api_access::gate`); the [`Actor`] it resolves to travels in the
//! request's extensions for handlers and the audit log.
//!
//! Operator tokens are looked up by id: a small in-process cache answers,
//! and on a miss (or, with a store shared by several instances, once an
//! entry is older than [`SHARED_CACHE_MS`]) the store is read again, so a
//! revocation made on another instance takes effect within that time and one
//! made here at once.

use super::store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

/// What an authenticated caller may do; ordered: each role has every right
/// of the roles before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The authenticated caller of one request (in the request's extensions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub name: String,
    pub role: Role,
    /// The operator token's id, or [`FILE_TOKEN_ID`].
    pub token_id: String,
}

/// Actor name and token id of the bootstrap token file's bearer.
pub const FILE_TOKEN_ID: &str = "token-file";

/// A stored operator token: everything but its secret, of which only the
/// SHA-256 is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorToken {
    /// 16 lowercase hex digits, the lookup key.
    pub id: String,
    pub name: String,
    pub role: Role,
    /// SHA-256 of the 32 secret bytes.
    pub hash: [u8; 32],
    pub created_ms: u64,
    /// Who created it (actor name).
    pub created_by: String,
    pub expires_at_ms: Option<u64>,
    pub revoked_at_ms: Option<u64>,
}

impl OperatorToken {
    /// The listing shape: no hash, no secret.
    pub fn public_json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "name": self.name,
            "role": self.role,
            "created_ms": self.created_ms,
            "created_by": self.created_by,
            "expires_at_ms": self.expires_at_ms,
            "revoked": self.revoked_at_ms.is_some(),
            "revoked_at_ms": self.revoked_at_ms,
        })
    }
}

/// A freshly made token: the record to store and the one-time secret text.
#[derive(Debug)]
pub struct NewToken {
    pub record: OperatorToken,
    /// `slo_<id>_<secret-hex>`: shown once, never stored.
    pub token: String,
}

/// Why a token could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NewTokenError {
    #[error("name must be 1 to 64 characters of letters, digits and . _ @ -")]
    Name,
    #[error("the OS random number generator failed: {0}")]
    Random(String),
}

/// Longest validity a token can be given (ten years).
pub const MAX_TTL_S: u64 = 10 * 365 * 24 * 3600;

/// Makes a token for `name` with `role`, valid `ttl_ms` from `now_ms` (or
/// forever).
pub fn new_token(
    name: &str,
    role: Role,
    ttl_ms: Option<u64>,
    created_by: &str,
    now_ms: u64,
) -> Result<NewToken, NewTokenError> {
    if !valid_name(name) {
        return Err(NewTokenError::Name);
    }
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    getrandom::getrandom(&mut id).map_err(|e| NewTokenError::Random(e.to_string()))?;
    getrandom::getrandom(&mut secret).map_err(|e| NewTokenError::Random(e.to_string()))?;
    let id = hex::encode(id);
    let token = format!("slo_{id}_{}", hex::encode(secret));
    Ok(NewToken {
        record: OperatorToken {
            id,
            name: name.to_owned(),
            role,
            hash: Sha256::digest(secret).into(),
            created_ms: now_ms,
            created_by: created_by.to_owned(),
            expires_at_ms: ttl_ms.map(|t| now_ms.saturating_add(t)),
            revoked_at_ms: None,
        },
        token,
    })
}

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c))
}

/// Whether `id` has the shape of an operator token id.
pub fn valid_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `slo_<id>_<secret-hex>` ⇒ (id, secret bytes).
fn split_token(presented: &str) -> Option<(&str, [u8; 32])> {
    let rest = presented.strip_prefix("slo_")?;
    let (id, secret) = rest.split_once('_')?;
    if !valid_id(id) {
        return None;
    }
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(secret, &mut bytes).ok()?;
    Some((id, bytes))
}

/// Byte comparison whose time does not depend on where the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a request is not authenticated (all answered 401).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing or wrong bearer token")]
    Missing,
    #[error("this token was revoked")]
    Revoked,
    #[error("this token expired")]
    Expired,
    #[error("the token store cannot be read: {0}")]
    Store(#[from] StoreError),
}

/// How long a cached token is trusted when other instances may revoke it.
pub const SHARED_CACHE_MS: u64 = 1000;

/// The API's authenticator: the token file's token and the operator tokens.
pub struct Access {
    file_token: String,
    store: Arc<dyn Store>,
    cache: Mutex<HashMap<String, (OperatorToken, Instant)>>,
    /// Cached entries older than this are read again (`None`: never, only
    /// this process writes the store).
    max_age: Option<std::time::Duration>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("Access").finish_non_exhaustive()
    }
}

impl Access {
    pub fn new(file_token: String, store: Arc<dyn Store>) -> Self {
        let max_age = store
            .is_shared()
            .then(|| std::time::Duration::from_millis(SHARED_CACHE_MS));
        Self {
            file_token,
            store,
            cache: Mutex::new(HashMap::new()),
            max_age,
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Resolves the `Authorization: Bearer` value (`None`: no header) to an
    /// actor, reading the store when the cache cannot answer. Blocking.
    pub fn authenticate(&self, presented: Option<&str>, now_ms: u64) -> Result<Actor, AuthError> {
        let presented = presented.ok_or(AuthError::Missing)?;
        if constant_time_eq(presented.as_bytes(), self.file_token.as_bytes()) {
            return Ok(Actor {
                name: FILE_TOKEN_ID.into(),
                role: Role::Admin,
                token_id: FILE_TOKEN_ID.into(),
            });
        }
        let (id, secret) = split_token(presented).ok_or(AuthError::Missing)?;
        let rec = self.lookup(id)?.ok_or(AuthError::Missing)?;
        let hash: [u8; 32] = Sha256::digest(secret).into();
        if !constant_time_eq(&hash, &rec.hash) {
            return Err(AuthError::Missing);
        }
        if rec.revoked_at_ms.is_some() {
            return Err(AuthError::Revoked);
        }
        if rec.expires_at_ms.is_some_and(|e| now_ms >= e) {
            return Err(AuthError::Expired);
        }
        Ok(Actor {
            name: rec.name,
            role: rec.role,
            token_id: rec.id,
        })
    }

    fn lookup(&self, id: &str) -> Result<Option<OperatorToken>, AuthError> {
        {
            let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some((rec, at)) = cache.get(id) {
                if self.max_age.is_none_or(|max| at.elapsed() < max) {
                    return Ok(Some(rec.clone()));
                }
            }
        }
        let rec = match self.store.load_operator_token(id) {
            Ok(r) => r,
            // A record this build cannot read (e.g. a role it does not
            // know, written by a newer allocator) grants nothing: 401.
            Err(StoreError::Corrupt { key, message }) => {
                tracing::warn!(%key, %message, "an operator token record is unreadable; refused");
                None
            }
            Err(e) => return Err(e.into()),
        };
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        match &rec {
            Some(r) => {
                cache.insert(id.to_owned(), (r.clone(), Instant::now()));
            }
            None => {
                cache.remove(id);
            }
        }
        Ok(rec)
    }

    /// Stores a new token (blocking) and caches it.
    pub fn create(&self, rec: &OperatorToken) -> Result<(), StoreError> {
        self.store.put_operator_token(rec)?;
        self.remember(rec);
        Ok(())
    }

    /// Revokes token `id` (blocking): `Ok(None)` when there is no such token.
    /// Revoking twice keeps the first revocation time.
    pub fn revoke(&self, id: &str, now_ms: u64) -> Result<Option<OperatorToken>, StoreError> {
        let Some(mut rec) = self.store.load_operator_token(id)? else {
            return Ok(None);
        };
        if rec.revoked_at_ms.is_none() {
            rec.revoked_at_ms = Some(now_ms);
            self.store.put_operator_token(&rec)?;
        }
        self.remember(&rec);
        Ok(Some(rec))
    }

    fn remember(&self, rec: &OperatorToken) {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(rec.id.clone(), (rec.clone(), Instant::now()));
    }
}

/// The role a request needs: reads need a viewer; device operations and
/// any other change an operator; enrolment, credentials, key rotation and
/// catalog or tier reloads an admin. `path` is the matched route template
/// (`/v1/devices/{id}`) or, for unrouted requests, the raw path.
pub fn required_role(method: &axum::http::Method, path: &str) -> Role {
    use axum::http::Method;
    if *method == Method::GET || *method == Method::HEAD {
        return Role::Viewer;
    }
    let admin = matches!(
        (method.as_str(), path),
        ("POST", "/v1/tokens")
            | ("POST", "/v1/devices")
            | ("DELETE", "/v1/devices/{id}")
            | ("POST", "/v1/rotate")
            | ("POST", "/v1/catalog/reload")
    ) || path.starts_with("/v1/operators/")
        || path == "/v1/operators"
        || path.starts_with("/v1/tiers");
    if admin {
        Role::Admin
    } else {
        Role::Operator
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    #[test]
    fn roles_are_ordered_and_routes_need_the_contracts_roles() {
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
        let need = |m: Method, p: &str| required_role(&m, p);
        assert_eq!(need(Method::GET, "/v1/operators/tokens"), Role::Viewer);
        assert_eq!(need(Method::GET, "/v1/audit"), Role::Viewer);
        assert_eq!(need(Method::POST, "/v1/devices/{id}/{op}"), Role::Operator);
        assert_eq!(
            need(Method::PUT, "/v1/devices/{id}/config/{shard}"),
            Role::Operator
        );
        assert_eq!(
            need(Method::POST, "/v1/rollouts/{shard}/{op}"),
            Role::Operator
        );
        assert_eq!(need(Method::POST, "/v1/devices"), Role::Admin);
        assert_eq!(need(Method::DELETE, "/v1/devices/{id}"), Role::Admin);
        assert_eq!(need(Method::POST, "/v1/tokens"), Role::Admin);
        assert_eq!(need(Method::POST, "/v1/operators/tokens"), Role::Admin);
        assert_eq!(
            need(Method::DELETE, "/v1/operators/tokens/{id}"),
            Role::Admin
        );
        assert_eq!(need(Method::POST, "/v1/rotate"), Role::Admin);
        assert_eq!(need(Method::POST, "/v1/catalog/reload"), Role::Admin);
        assert_eq!(need(Method::POST, "/v1/tiers/reload"), Role::Admin);
    }

    #[test]
    fn access_resolves_file_and_operator_tokens_and_refuses_the_rest() {
        let dir = std::env::temp_dir().join(format!("sl-access-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store: Arc<dyn Store> =
            Arc::new(super::super::store::RedbStore::open(&dir.join("s.redb")).unwrap());
        let access = Access::new("file-token".into(), store.clone());
        let admin = access.authenticate(Some("file-token"), 0).unwrap();
        assert_eq!(
            (admin.name.as_str(), admin.role),
            (FILE_TOKEN_ID, Role::Admin)
        );
        assert!(matches!(
            access.authenticate(None, 0),
            Err(AuthError::Missing)
        ));
        assert!(matches!(
            access.authenticate(Some("file-token2"), 0),
            Err(AuthError::Missing)
        ));

        let t = new_token("ana", Role::Operator, Some(1000), "file", 100).unwrap();
        access.create(&t.record).unwrap();
        let a = access.authenticate(Some(&t.token), 500).unwrap();
        assert_eq!(
            (a.name.as_str(), a.role, a.token_id.as_str()),
            ("ana", Role::Operator, t.record.id.as_str())
        );
        // The right id with another secret is no token at all.
        let forged = format!("slo_{}_{}", t.record.id, "ab".repeat(32));
        assert!(matches!(
            access.authenticate(Some(&forged), 500),
            Err(AuthError::Missing)
        ));
        assert!(matches!(
            access.authenticate(Some(&t.token), 1100),
            Err(AuthError::Expired)
        ));
        // A second instance on the same store (nothing cached) agrees,
        // and a revocation is seen by the revoker at once.
        let other = Access::new("x".into(), store);
        assert!(other.authenticate(Some(&t.token), 500).is_ok());
        assert!(access.revoke(&t.record.id, 600).unwrap().is_some());
        assert!(matches!(
            access.authenticate(Some(&t.token), 700),
            Err(AuthError::Revoked)
        ));
        assert!(access.revoke("0000000000000000", 600).unwrap().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_token_splits_into_id_and_secret_and_nothing_else_does() {
        let t = new_token("alice", Role::Viewer, None, "x", 5).unwrap();
        let (id, secret) = split_token(&t.token).unwrap();
        assert_eq!(id, t.record.id);
        assert_eq!(<[u8; 32]>::from(Sha256::digest(secret)), t.record.hash);
        assert!(!t.token.contains(&hex::encode(t.record.hash)));
        for bad in [
            "",
            "slo_",
            "slo_0123456789abcdef",
            "slo_0123456789ABCDEF_00",
            "slo_0123_00",
            &format!("slo_{}_{}", t.record.id, "zz".repeat(32)),
            &format!("xlo_{}_{}", t.record.id, "00".repeat(32)),
        ] {
            assert!(split_token(bad).is_none(), "{bad:?}");
        }
        assert!(new_token("bad name", Role::Viewer, None, "x", 5).is_err());
        assert!(new_token("", Role::Viewer, None, "x", 5).is_err());
        assert_eq!(
            new_token("a", Role::Admin, Some(10), "x", 5)
                .unwrap()
                .record
                .expires_at_ms,
            Some(15)
        );
    }
}
