//! How `conversations` and `conversation_chunks` are laid out: plain
//! tables, or (`database.partitions = N`) `PARTITION BY HASH (user_id)`
//! with N partitions each — the native PostgreSQL stand-in for a Citus
//! distribution by `user_id`, which enforces the same key rules (every
//! primary and unique key contains `user_id`). docs/STORAGE.md.
//!
//! The migrations always create plain tables. [`ensure_layout`] runs after
//! them: with N > 0 on a database where both tables are still empty it
//! replaces them by partitioned ones (`sql/partitioned.sql`) and creates
//! the partitions, in one transaction under the schema lock; a database
//! that already holds conversations in plain tables is refused (there is
//! no in-place conversion: load a dump into a fresh partitioned database,
//! docs/STORAGE.md). With N = 0 whatever layout is found is used.

use std::fmt;

use sqlx::PgPool;
use sqlx::postgres::PgConnection;

use super::StoreError;
use super::schema::SCHEMA_LOCK_KEY;
use crate::settings::MAX_PARTITIONS;

/// The partitioned parents and the DDL that makes them.
const PARTITIONED_SQL: &str = include_str!("../sql/partitioned.sql");

/// The two tables split by user.
pub const PARTITIONED_TABLES: [&str; 2] = ["conversations", "conversation_chunks"];

/// The layout found (or made) at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Plain tables.
    Plain,
    /// Hash-partitioned by `user_id` into this many partitions each.
    Partitioned { partitions: u32 },
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Plain => f.write_str("plain tables"),
            Self::Partitioned { partitions } => write!(
                f,
                "hash-partitioned by user_id, {partitions} partitions per table"
            ),
        }
    }
}

/// The layout of both tables; an error when they disagree (someone
/// changed one by hand).
pub async fn current_layout(conn: &mut PgConnection) -> Result<Layout, StoreError> {
    let mut found = Vec::with_capacity(PARTITIONED_TABLES.len());
    for table in PARTITIONED_TABLES {
        let row: Option<(String, i64)> = sqlx::query_as(
            "SELECT p.partstrat::text, \
                    (SELECT count(*) FROM pg_inherits i WHERE i.inhparent = p.partrelid) \
             FROM pg_partitioned_table p WHERE p.partrelid = to_regclass($1)",
        )
        .bind(table)
        .fetch_optional(&mut *conn)
        .await?;
        let layout = match row {
            None => Layout::Plain,
            Some((strategy, n)) if strategy == "h" => Layout::Partitioned {
                partitions: u32::try_from(n).unwrap_or(0),
            },
            Some((strategy, _)) => {
                return Err(StoreError::Schema(format!(
                    "{table} is partitioned by strategy `{strategy}`; convstore knows plain \
                     tables and hash partitions by user_id only"
                )));
            }
        };
        found.push(layout);
    }
    match found.as_slice() {
        [a, b] if a == b => Ok(*a),
        _ => Err(StoreError::Schema(format!(
            "conversations ({}) and conversation_chunks ({}) have different layouts; \
             both must be plain or both hash-partitioned by user_id alike",
            found.first().copied().unwrap_or(Layout::Plain),
            found.get(1).copied().unwrap_or(Layout::Plain),
        ))),
    }
}

/// Makes the layout `database.partitions` asks for, or says why it cannot;
/// returns the layout in use. See the module docs.
pub async fn ensure_layout(pool: &PgPool, partitions: u32) -> Result<Layout, StoreError> {
    if partitions == 1 || partitions > MAX_PARTITIONS {
        return Err(StoreError::Schema(format!(
            "database.partitions is {partitions}; use 0 (plain tables) or 2 to {MAX_PARTITIONS}"
        )));
    }
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(SCHEMA_LOCK_KEY)
        .execute(&mut *tx)
        .await?;
    let found = current_layout(&mut tx).await?;
    let layout = match (found, partitions) {
        (found, 0) => found,
        (Layout::Partitioned { partitions: n }, wanted) if n == wanted => found,
        (Layout::Partitioned { partitions: n }, wanted) => {
            return Err(StoreError::Schema(format!(
                "the database's tables have {n} hash partitions; database.partitions is \
                 {wanted}. The count is fixed when the database is created: set \
                 database.partitions = {n} (or 0, to use whatever layout is found)"
            )));
        }
        (Layout::Plain, wanted) => {
            let empty: bool = sqlx::query_scalar(
                "SELECT NOT EXISTS (SELECT 1 FROM conversations) \
                    AND NOT EXISTS (SELECT 1 FROM conversation_chunks)",
            )
            .fetch_one(&mut *tx)
            .await?;
            if !empty {
                return Err(StoreError::Schema(format!(
                    "database.partitions is {wanted}, but this database already holds \
                     conversations in plain (unpartitioned) tables, and convstore does not \
                     convert them in place. Either keep plain tables (database.partitions = 0), \
                     or create a new database with database.partitions = {wanted} and load \
                     this one's rows into it (docs/STORAGE.md, \"Partitioned tables\")"
                )));
            }
            partition(&mut tx, wanted).await?;
            Layout::Partitioned { partitions: wanted }
        }
    };
    tx.commit().await?;
    tracing::info!(%layout, "Database layout");
    Ok(layout)
}

/// Replaces the (empty) plain tables by partitioned ones with `n`
/// partitions each.
async fn partition(conn: &mut PgConnection, n: u32) -> Result<(), StoreError> {
    tracing::info!(
        partitions = n,
        "Creating conversations and conversation_chunks hash-partitioned by user_id"
    );
    sqlx::raw_sql(PARTITIONED_SQL).execute(&mut *conn).await?;
    let mut ddl = String::new();
    for table in PARTITIONED_TABLES {
        for i in 0..n {
            // `n` and `i` are checked integers and the table names
            // constants: nothing here comes from outside.
            ddl.push_str(&format!(
                "CREATE TABLE {table}_p{i} PARTITION OF {table} \
                 FOR VALUES WITH (MODULUS {n}, REMAINDER {i});\n"
            ));
        }
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(ddl))
        .execute(&mut *conn)
        .await?;
    Ok(())
}
