//! The PostgreSQL store's schema migrations, lock keys and statements.

/// Advisory lock key of the fleet-wide lead ("SHLNLEAD").
pub(super) const LEAD_LOCK_KEY: i64 = 0x5348_4c4e_4c45_4144;
/// Advisory lock key serialising schema migrations ("SHLNSCHM").
pub(super) const SCHEMA_LOCK_KEY: i64 = 0x5348_4c4e_5343_484d;

/// Schema migrations, in order; `MIGRATIONS[i]` takes version `i` to `i + 1`.
/// Append only: deployed databases have run the earlier ones.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: the first schema. `COLLATE "C"`: ids compare and sort by bytes,
    // like the embedded store's keys.
    r#"
    CREATE TABLE devices (
        id text COLLATE "C" PRIMARY KEY,
        version bigint NOT NULL,
        last_report_seq bigint NOT NULL,
        body bytea NOT NULL
    );
    CREATE TABLE tokens (
        hash text COLLATE "C" PRIMARY KEY,
        body bytea NOT NULL
    );
    CREATE TABLE meta (
        key text COLLATE "C" PRIMARY KEY,
        body bytea NOT NULL
    );
    "#,
    // 2: tombstones of unenrolled devices (issue 15); the engine's catalog
    // health lives in `meta` under its own key.
    r#"
    CREATE TABLE tombstones (
        id text COLLATE "C" PRIMARY KEY,
        body bytea NOT NULL
    );
    "#,
    // 3: the devices' history (issue 20), pruned by age and count.
    r#"
    CREATE TABLE history (
        id bigserial PRIMARY KEY,
        device text COLLATE "C" NOT NULL,
        at_ms bigint NOT NULL,
        kind text NOT NULL,
        body bytea NOT NULL
    );
    CREATE INDEX history_by_device ON history (device, at_ms DESC, id DESC);
    CREATE INDEX history_by_age ON history (at_ms);
    "#,
    // 4: operator tokens (only their secret's hash) and the audit log
    // (issue 20, `store_pg::access`).
    r#"
    CREATE TABLE operator_tokens (
        id text COLLATE "C" PRIMARY KEY,
        body bytea NOT NULL
    );
    CREATE TABLE audit (
        id bigserial PRIMARY KEY,
        at_ms bigint NOT NULL,
        actor text NOT NULL,
        target text NOT NULL,
        body bytea NOT NULL
    );
    CREATE INDEX audit_at_ms ON audit (at_ms);
    "#,
    // 5: the regional assignment (issue 19, `store_pg::assign`): each
    // instance's heartbeat, each group's last object, its versions.
    r#"
    CREATE TABLE assign_servers (
        id text COLLATE "C" PRIMARY KEY,
        body bytea NOT NULL
    );
    CREATE TABLE assignments (
        grp text COLLATE "C" PRIMARY KEY,
        version bigint NOT NULL,
        body bytea NOT NULL
    );
    CREATE TABLE assign_history (
        id bigserial PRIMARY KEY,
        grp text COLLATE "C" NOT NULL,
        version bigint NOT NULL,
        body bytea NOT NULL
    );
    CREATE INDEX assign_history_by_group ON assign_history (grp, id DESC);
    "#,
    // 6: the current capacity shortfall per region (issue 19,
    // `store_pg::assign`), written by the lead, read by every instance.
    r#"
    CREATE TABLE assign_shortfalls (
        region text COLLATE "C" PRIMARY KEY,
        body bytea NOT NULL
    );
    "#,
];

/// The schema version this build creates and understands.
pub(super) const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

pub(super) const SQL_CREATE: &str = "INSERT INTO devices (id, version, last_report_seq, body) \
     SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::bytea[]) \
     ON CONFLICT (id) DO NOTHING RETURNING id";
pub(super) const SQL_PUT: &str = "UPDATE devices AS d \
     SET version = u.version, last_report_seq = u.seq, body = u.body \
     FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::bytea[]) \
       AS u(id, prev, version, seq, body) \
     WHERE d.id = u.id AND d.version = u.prev RETURNING d.id";
pub(super) const SQL_FLOOR: &str = "UPDATE devices AS d \
     SET version = u.version, last_report_seq = u.seq \
     FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[]) \
       AS u(id, prev, version, seq) \
     WHERE d.id = u.id AND d.version = u.prev RETURNING d.id";
pub(super) const SQL_DELETE: &str = "DELETE FROM devices WHERE id = ANY($1::text[])";
pub(super) const SQL_TOKEN_PUT: &str = "INSERT INTO tokens (hash, body) \
     SELECT * FROM unnest($1::text[], $2::bytea[]) \
     ON CONFLICT (hash) DO UPDATE SET body = EXCLUDED.body";
pub(super) const SQL_TOKEN_DELETE: &str = "DELETE FROM tokens WHERE hash = ANY($1::text[])";
pub(super) const SQL_META_PUT: &str = "INSERT INTO meta (key, body) VALUES ('meta', $1) \
     ON CONFLICT (key) DO UPDATE SET body = EXCLUDED.body";
pub(super) const SQL_LOAD_ALL: &str =
    "SELECT id, version, last_report_seq, body FROM devices ORDER BY id";
pub(super) const SQL_LOAD_SOME: &str =
    "SELECT id, version, last_report_seq, body FROM devices WHERE id = ANY($1::text[])";
pub(super) const SQL_VERSIONS_ALL: &str = "SELECT id, version FROM devices ORDER BY id";
pub(super) const SQL_VERSIONS_SOME: &str =
    "SELECT id, version FROM devices WHERE id = ANY($1::text[])";
pub(super) const SQL_TOKENS: &str = "SELECT hash, body FROM tokens ORDER BY hash";
pub(super) const SQL_META: &str = "SELECT body FROM meta WHERE key = 'meta'";
pub(super) const SQL_HEALTH_PUT: &str =
    "INSERT INTO meta (key, body) VALUES ('catalog_health', $1) \
     ON CONFLICT (key) DO UPDATE SET body = EXCLUDED.body";
pub(super) const SQL_HEALTH: &str = "SELECT body FROM meta WHERE key = 'catalog_health'";
pub(super) const SQL_ROLLOUTS_PUT: &str = "INSERT INTO meta (key, body) VALUES ('rollouts', $1) \
     ON CONFLICT (key) DO UPDATE SET body = EXCLUDED.body";
pub(super) const SQL_ROLLOUTS: &str = "SELECT body FROM meta WHERE key = 'rollouts'";
pub(super) const SQL_DIAG_PUT: &str = "INSERT INTO meta (key, body) \
     SELECT 'diag/' || d, b FROM unnest($1::text[], $2::bytea[]) AS x(d, b) \
     ON CONFLICT (key) DO UPDATE SET body = EXCLUDED.body";
pub(super) const SQL_DIAG_DELETE: &str =
    "DELETE FROM meta WHERE key IN (SELECT 'diag/' || d FROM unnest($1::text[]) AS x(d))";
pub(super) const SQL_DIAG: &str =
    "SELECT substr(key, 6), body FROM meta WHERE key LIKE 'diag/%' ORDER BY key";
pub(super) const SQL_TOMB_PUT: &str = "INSERT INTO tombstones (id, body) \
     SELECT * FROM unnest($1::text[], $2::bytea[]) \
     ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body";
pub(super) const SQL_TOMB_DELETE: &str = "DELETE FROM tombstones WHERE id = ANY($1::text[])";
pub(super) const SQL_TOMBS: &str = "SELECT id, body FROM tombstones ORDER BY id";
