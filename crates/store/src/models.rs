//! Embedding models and where their vectors are: changing `embedding.model`
//! (or its dimension) without downtime (docs/SEARCH.md "Changing the
//! model").
//!
//! Layout:
//!
//! - The **current** model (the configured one) keeps its vectors where
//!   they always were, `conversation_chunks.embedding`, typed
//!   `vector(dimensions)` with its HNSW index. The writer, the backfill and
//!   the caches know only this column.
//! - The **previous** model's vectors, while they are kept, are in their
//!   own table, [`PREVIOUS_TABLE`] (`user_id, conversation_id, seq,
//!   embedding vector(previous dimensions)`) with an HNSW index of their
//!   own: two indexes of different dimensions, side by side. Its foreign key
//!   to the chunk (`ON DELETE CASCADE ON UPDATE CASCADE`) makes a delete,
//!   an erasure, retention or a rewritten conversation take the old vector
//!   with the chunk, and a chunk renumbered by a split carry it along.
//! - `embedding_models` (migration 0007) says which model is which, and
//!   whether search still reads the previous one.
//!
//! A change, at start-up ([`prepare_vectors`], one transaction under the
//! schema lock): the current column's vectors are copied into a fresh
//! previous table (then indexed in one build, much faster than row by
//! row), every chunk becomes `pending` for the new model, the column is
//! retyped to the new dimension and indexed (empty), and the backfill
//! re-embeds the chunks through the router and the caches as it does any
//! pending chunk, one batch's worth of backend capacity at a time so that
//! ingest keeps flowing. Search reads the previous vectors (the query
//! embedded with the previous model) until no chunk is pending any more
//! ([`Store::retire_previous`]), then the current column. The previous
//! table is dropped at the next start, or after `search.keep_previous_model`
//! ([`KeepPrevious`]).
//!
//! Another change while one is under way keeps the previous table (it is
//! the one set that covers every chunk) and starts the re-embedding over
//! for the newest model.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;
use sqlx::postgres::{PgConnection, PgPool};

use super::StoreError;
use super::schema::{self, HNSW_MAX_DIMENSIONS, SCHEMA_LOCK_KEY};

/// The previous model's vectors, while they are kept.
pub const PREVIOUS_TABLE: &str = "previous_chunk_embeddings";
/// Its cosine HNSW index (same parameters as the current column's).
pub const PREVIOUS_HNSW_INDEX: &str = "previous_chunk_embeddings_hnsw_idx";

/// A model and the length of its vectors: two models are the same only
/// when both match (a Matryoshka model shortened to another dimension is
/// another set of vectors).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ModelId {
    pub model: String,
    pub dimensions: usize,
}

impl ModelId {
    pub fn new(model: impl Into<String>, dimensions: usize) -> Self {
        Self {
            model: model.into(),
            dimensions,
        }
    }
}

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` ({} dimensions)", self.model, self.dimensions)
    }
}

/// The model before the last change, while its vectors are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviousModel {
    pub id: ModelId,
    /// When the change began (the re-embedding started).
    pub since: DateTime<Utc>,
    /// When search switched to the current model; `None` while search
    /// still reads these vectors.
    pub retired_at: Option<DateTime<Utc>>,
}

/// Which model is which.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelState {
    pub current: ModelId,
    pub previous: Option<PreviousModel>,
}

impl ModelState {
    /// The vectors semantic search reads now.
    pub fn searched(&self) -> VectorSet {
        if self.migrating() {
            VectorSet::Previous
        } else {
            VectorSet::Current
        }
    }

    /// Whether the current model is still re-embedding what the previous
    /// one covers (search reads the previous vectors meanwhile).
    pub fn migrating(&self) -> bool {
        self.previous
            .as_ref()
            .is_some_and(|p| p.retired_at.is_none())
    }

    /// The model whose vectors semantic search reads now.
    pub fn searched_model(&self) -> &ModelId {
        match (&self.previous, self.searched()) {
            (Some(previous), VectorSet::Previous) => &previous.id,
            _ => &self.current,
        }
    }
}

/// A set of vectors semantic search can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VectorSet {
    /// The configured model's, in `conversation_chunks.embedding`.
    #[default]
    Current,
    /// The previous model's, in [`PREVIOUS_TABLE`].
    Previous,
}

impl VectorSet {
    /// The table whose `embedding` (with `user_id, conversation_id, seq`)
    /// holds these vectors: a constant, so it may be formatted into SQL.
    pub(crate) fn table(self) -> &'static str {
        match self {
            Self::Current => "conversation_chunks",
            Self::Previous => PREVIOUS_TABLE,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Current => "current",
            Self::Previous => "previous",
        }
    }
}

/// How long the previous model's vectors are kept once search switched to
/// the current model (`search.keep_previous_model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeepPrevious {
    /// Until the next start (the default): while the daemon that switched
    /// runs, the old vectors stay, so an operator can check the switch
    /// before the space is given back; the next start drops them.
    #[default]
    UntilNextStart,
    /// This long after the switch (a running daemon drops them).
    For(Duration),
}

/// How far the current model's vectors cover the chunks, and how many the
/// previous model's table still holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct ModelCoverage {
    pub chunks: u64,
    pub embedded: u64,
    pub pending: u64,
    pub failed: u64,
    /// Rows of [`PREVIOUS_TABLE`] (`None` without one).
    pub previous_vectors: Option<u64>,
}

impl ModelCoverage {
    /// Embedded chunks / all chunks (1 with no chunks).
    pub fn current_ratio(&self) -> f64 {
        ratio(self.embedded, self.chunks)
    }

    /// Previous vectors / all chunks.
    pub fn previous_ratio(&self) -> Option<f64> {
        self.previous_vectors.map(|n| ratio(n, self.chunks))
    }
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        1.0
    } else {
        part as f64 / whole as f64
    }
}

/// Makes the vectors ready for `configured`, starting a change of model
/// when the database holds another one's (see the module docs), and
/// returns which model is which. `keep`: whether a previous model that
/// search no longer reads is dropped now (at start) or kept.
///
/// A database with no vectors at all takes any dimension at once, as
/// before. Everything runs in one transaction under the schema lock, so
/// instances starting together do it once; the others wait and find it
/// done.
pub async fn prepare_vectors(
    pool: &PgPool,
    configured: &ModelId,
    keep: KeepPrevious,
    hnsw: schema::HnswBuild,
) -> Result<ModelState, StoreError> {
    let dims = configured.dimensions;
    if dims == 0 || dims > HNSW_MAX_DIMENSIONS {
        return Err(StoreError::Schema(format!(
            "embedding.dimensions is {dims}; the HNSW index supports 1 to {HNSW_MAX_DIMENSIONS} dimensions"
        )));
    }
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(SCHEMA_LOCK_KEY)
        .execute(&mut *tx)
        .await?;

    let Some(column) = schema::column_dimensions(&mut tx).await? else {
        // A fresh database (or one whose column was never typed): the
        // usual first start.
        tx.commit().await?;
        schema::ensure_vector_column(pool, dims, hnsw).await?;
        let mut conn = pool.acquire().await?;
        write_current(&mut conn, configured).await?;
        return read_state(&mut conn, configured).await;
    };
    let recorded = read_rows(&mut tx).await?;
    let stored = match recorded.current {
        Some(current) if current.dimensions == column => current,
        // Before migration 0007 (or a column retyped by hand): the model
        // the stored chunks name.
        _ => ModelId::new(
            schema::stored_model(&mut tx)
                .await?
                .unwrap_or_else(|| configured.model.clone()),
            column,
        ),
    };
    let previous = recorded.previous;

    if stored == *configured {
        if let Some(p) = &previous
            && p.retired_at.is_some()
            && keep == KeepPrevious::UntilNextStart
        {
            tracing::info!(
                previous = %p.id,
                "Dropping the previous model's vectors: search switched away from them before this start"
            );
            drop_previous_table(&mut tx).await?;
        }
        write_current(&mut tx, configured).await?;
        tx.commit().await?;
        // Creates the index if it is missing; the column is right.
        schema::ensure_vector_column(pool, dims, hnsw).await?;
        let mut conn = pool.acquire().await?;
        return read_state(&mut conn, configured).await;
    }

    // The model changed.
    let has_vectors: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM conversation_chunks WHERE embedding IS NOT NULL)",
    )
    .fetch_one(&mut *tx)
    .await?;
    match &previous {
        Some(p) if p.retired_at.is_none() => {
            tracing::warn!(
                previous = %p.id,
                interrupted = %stored,
                new = %configured,
                "The model changed again before the last change finished re-embedding: search keeps \
                 the previous model's vectors, and every chunk is re-embedded for the new model"
            );
        }
        _ if has_vectors => {
            drop_previous_table(&mut tx).await?;
            let kept = copy_to_previous(&mut tx, &stored).await?;
            tracing::info!(
                previous = %stored,
                new = %configured,
                vectors = kept,
                "The embedding model changed: search keeps the previous model's vectors while every \
                 chunk is re-embedded with the new one"
            );
        }
        _ => {
            drop_previous_table(&mut tx).await?;
            tracing::info!(
                previous = %stored,
                new = %configured,
                "The embedding model changed; no chunk had a vector yet, nothing to keep"
            );
        }
    }
    let reset = reset_for(&mut tx, configured).await?;
    tracing::info!(
        chunks = reset,
        model = %configured,
        "Every chunk is pending for the new model; the backfill re-embeds them"
    );
    write_current(&mut tx, configured).await?;
    tx.commit().await?;
    schema::ensure_vector_column(pool, dims, hnsw).await?;
    let mut conn = pool.acquire().await?;
    read_state(&mut conn, configured).await
}

/// Copies the current column's vectors into a fresh previous table, indexes
/// it, and records `model` as the previous model. Returns the vectors
/// kept.
async fn copy_to_previous(conn: &mut PgConnection, model: &ModelId) -> Result<u64, StoreError> {
    let dims = model.dimensions;
    // `dims` comes from the column's type modifier (1..=2000): safe to
    // format into the DDL, which takes no bind parameters.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {PREVIOUS_TABLE} (\
           user_id text NOT NULL, \
           conversation_id uuid NOT NULL, \
           seq integer NOT NULL, \
           embedding vector({dims}) NOT NULL, \
           PRIMARY KEY (user_id, conversation_id, seq), \
           FOREIGN KEY (user_id, conversation_id, seq) \
             REFERENCES conversation_chunks (user_id, conversation_id, seq) \
             ON DELETE CASCADE ON UPDATE CASCADE)"
    )))
    .execute(&mut *conn)
    .await?;
    let copied = sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {PREVIOUS_TABLE} (user_id, conversation_id, seq, embedding) \
         SELECT user_id, conversation_id, seq, embedding FROM conversation_chunks \
         WHERE embedding IS NOT NULL"
    )))
    .execute(&mut *conn)
    .await?
    .rows_affected();
    // Built after the copy: one build is many times faster than inserting
    // row by row into an index.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE INDEX {PREVIOUS_HNSW_INDEX} ON {PREVIOUS_TABLE} \
         USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)"
    )))
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO embedding_models (role, model, dimensions, since, retired_at) \
         VALUES ('previous', $1, $2, now(), NULL) \
         ON CONFLICT (role) DO UPDATE SET model = EXCLUDED.model, \
           dimensions = EXCLUDED.dimensions, since = EXCLUDED.since, retired_at = NULL",
    )
    .bind(&model.model)
    .bind(i32::try_from(dims).unwrap_or(i32::MAX))
    .execute(&mut *conn)
    .await?;
    Ok(copied)
}

/// Every chunk pending for `model`, its vector gone, the column retyped to
/// the new dimension (its index dropped: start-up builds it again, empty).
/// Returns the chunks reset.
async fn reset_for(conn: &mut PgConnection, model: &ModelId) -> Result<u64, StoreError> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP INDEX IF EXISTS {}",
        schema::HNSW_INDEX
    )))
    .execute(&mut *conn)
    .await?;
    // Failed chunks too: the new model may take what the old refused.
    let reset = sqlx::query(
        "UPDATE conversation_chunks SET model = $1, embedding = NULL, \
           embedding_status = 'pending', error = NULL, embedded_at = NULL, \
           embed_attempts = 0, next_attempt_at = NULL",
    )
    .bind(&model.model)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    sqlx::query(
        "UPDATE conversations c SET embedding_status = 'pending' \
         WHERE embedding_status <> 'pending' AND EXISTS \
           (SELECT 1 FROM conversation_chunks k \
            WHERE k.user_id = c.user_id AND k.conversation_id = c.id)",
    )
    .execute(&mut *conn)
    .await?;
    // `dimensions` was checked (1..=2000) by the caller.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE conversation_chunks ALTER COLUMN embedding TYPE vector({})",
        model.dimensions
    )))
    .execute(&mut *conn)
    .await?;
    Ok(reset)
}

async fn drop_previous_table(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP TABLE IF EXISTS {PREVIOUS_TABLE}"
    )))
    .execute(&mut *conn)
    .await?;
    sqlx::query("DELETE FROM embedding_models WHERE role = 'previous'")
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn write_current(conn: &mut PgConnection, model: &ModelId) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO embedding_models (role, model, dimensions) VALUES ('current', $1, $2) \
         ON CONFLICT (role) DO UPDATE SET model = EXCLUDED.model, \
           dimensions = EXCLUDED.dimensions, \
           since = CASE WHEN embedding_models.model = EXCLUDED.model \
                         AND embedding_models.dimensions = EXCLUDED.dimensions \
                        THEN embedding_models.since ELSE now() END",
    )
    .bind(&model.model)
    .bind(i32::try_from(model.dimensions).unwrap_or(i32::MAX))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The rows of `embedding_models`.
struct Recorded {
    current: Option<ModelId>,
    previous: Option<PreviousModel>,
}

async fn read_rows(conn: &mut PgConnection) -> Result<Recorded, StoreError> {
    let rows =
        sqlx::query("SELECT role, model, dimensions, since, retired_at FROM embedding_models")
            .fetch_all(&mut *conn)
            .await?;
    let mut recorded = Recorded {
        current: None,
        previous: None,
    };
    for row in rows {
        let role: String = row.try_get("role")?;
        let dims: i32 = row.try_get("dimensions")?;
        let id = ModelId::new(
            row.try_get::<String, _>("model")?,
            usize::try_from(dims).unwrap_or(0),
        );
        match role.as_str() {
            "current" => recorded.current = Some(id),
            _ => {
                recorded.previous = Some(PreviousModel {
                    id,
                    since: row.try_get("since")?,
                    retired_at: row.try_get("retired_at")?,
                });
            }
        }
    }
    Ok(recorded)
}

async fn read_state(conn: &mut PgConnection, fallback: &ModelId) -> Result<ModelState, StoreError> {
    let recorded = read_rows(conn).await?;
    Ok(ModelState {
        current: recorded.current.unwrap_or_else(|| fallback.clone()),
        previous: recorded.previous,
    })
}

impl super::Store {
    /// [`prepare_vectors`]; remembers the dimension so that
    /// [`Store::write_batch`](super::Store::write_batch) checks vectors
    /// before sending.
    pub async fn prepare_vectors(
        &self,
        configured: &ModelId,
        keep: KeepPrevious,
    ) -> Result<ModelState, StoreError> {
        let state = prepare_vectors(&self.pool, configured, keep, self.hnsw).await?;
        self.set_dimensions(configured.dimensions);
        Ok(state)
    }

    /// Which model is which now (another instance may have switched).
    pub async fn model_state(&self, configured: &ModelId) -> Result<ModelState, StoreError> {
        let mut conn = self.pool.acquire().await?;
        read_state(&mut conn, configured).await
    }

    /// Chunks per status, and the previous model's vectors: one scan of
    /// the chunk table (sampled every few seconds while a change is under
    /// way, and rarely otherwise).
    pub async fn model_coverage(&self) -> Result<ModelCoverage, StoreError> {
        let (chunks, embedded, pending, failed): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT count(*), \
                    count(*) FILTER (WHERE embedding_status = 'embedded'), \
                    count(*) FILTER (WHERE embedding_status = 'pending'), \
                    count(*) FILTER (WHERE embedding_status = 'failed') \
             FROM conversation_chunks",
        )
        .fetch_one(&self.pool)
        .await?;
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(PREVIOUS_TABLE)
            .fetch_one(&self.pool)
            .await?;
        let previous_vectors = if exists {
            // (Dropped by another instance in between: an error this
            // once, which the caller logs and samples again.)
            let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT count(*) FROM {PREVIOUS_TABLE}"
            )))
            .fetch_one(&self.pool)
            .await?;
            Some(n)
        } else {
            None
        };
        let n = |x: i64| u64::try_from(x).unwrap_or(0);
        Ok(ModelCoverage {
            chunks: n(chunks),
            embedded: n(embedded),
            pending: n(pending),
            failed: n(failed),
            previous_vectors: previous_vectors.map(n),
        })
    }

    /// Switches search to the current model when no chunk is pending any
    /// more: marks the previous model retired. Returns whether this call
    /// switched (false: chunks still pending, nothing to switch from, or
    /// another instance did it).
    pub async fn retire_previous(&self) -> Result<bool, StoreError> {
        let switched = sqlx::query(
            "UPDATE embedding_models SET retired_at = now() \
             WHERE role = 'previous' AND retired_at IS NULL \
               AND NOT EXISTS (SELECT 1 FROM conversation_chunks \
                               WHERE embedding_status = 'pending')",
        )
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(switched > 0)
    }

    /// Drops the previous model's vectors when search switched away from
    /// them at least `after` ago. Returns whether this call dropped them.
    pub async fn drop_retired_previous(&self, after: Duration) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(SCHEMA_LOCK_KEY)
            .execute(&mut *tx)
            .await?;
        let due: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM embedding_models WHERE role = 'previous' \
               AND retired_at IS NOT NULL \
               AND retired_at <= now() - make_interval(secs => $1))",
        )
        .bind(after.as_secs_f64())
        .fetch_one(&mut *tx)
        .await?;
        if due {
            drop_previous_table(&mut tx).await?;
        }
        tx.commit().await?;
        Ok(due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(previous: Option<Option<DateTime<Utc>>>) -> ModelState {
        ModelState {
            current: ModelId::new("new", 8),
            previous: previous.map(|retired_at| PreviousModel {
                id: ModelId::new("old", 4),
                since: DateTime::<Utc>::MIN_UTC,
                retired_at,
            }),
        }
    }

    #[test]
    fn search_reads_the_previous_vectors_only_while_migrating() {
        let alone = state(None);
        assert!(!alone.migrating());
        assert_eq!(alone.searched(), VectorSet::Current);
        assert_eq!(alone.searched_model().model, "new");

        let migrating = state(Some(None));
        assert!(migrating.migrating());
        assert_eq!(migrating.searched(), VectorSet::Previous);
        assert_eq!(migrating.searched_model(), &ModelId::new("old", 4));

        let switched = state(Some(Some(DateTime::<Utc>::MIN_UTC)));
        assert!(!switched.migrating());
        assert_eq!(switched.searched(), VectorSet::Current);
        assert_eq!(switched.searched_model().model, "new");
    }

    #[test]
    fn coverage_ratios() {
        let c = ModelCoverage {
            chunks: 200,
            embedded: 50,
            pending: 150,
            failed: 0,
            previous_vectors: Some(200),
        };
        assert!((c.current_ratio() - 0.25).abs() < 1e-12);
        assert_eq!(c.previous_ratio(), Some(1.0));
        assert!((ModelCoverage::default().current_ratio() - 1.0).abs() < 1e-12);
        assert_eq!(ModelCoverage::default().previous_ratio(), None);
    }
}
