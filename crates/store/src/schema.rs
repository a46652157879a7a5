//! The parts of the schema that depend on the configuration, not on the
//! schema version: the vector dimension and the HNSW index.
//!
//! An HNSW index needs a fixed dimension, and the dimension belongs to the
//! embedding model the operator configured. So the migration leaves
//! `conversation_chunks.embedding` as a bare `vector`, and start-up fixes it
//! to `vector(embedding.dimensions)` and builds the index.
//! [`ensure_vector_column`] alone refuses another dimension with an
//! explanation instead of mixing vectors of different models in one index;
//! the daemon's start-up goes through [`crate::models::prepare_vectors`],
//! which turns a change of model into a background re-embedding.

use sqlx::PgPool;
use sqlx::postgres::PgConnection;

use super::StoreError;

/// Name of the cosine HNSW index on `conversation_chunks.embedding`.
pub const HNSW_INDEX: &str = "conversation_chunks_embedding_hnsw_idx";

/// The build parameters of the HNSW index (`database.hnsw_m`,
/// `database.hnsw_ef_construction`), written out when the index is
/// created so that a change of pgvector's defaults does not silently change
/// ours. They bound what an insert costs and what recall a search at a
/// given `ef_search` reaches (docs/PERFORMANCE.md "Managed PostgreSQL for
/// HNSW ingest"). An existing index keeps the parameters it was built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HnswBuild {
    pub m: u32,
    pub ef_construction: u32,
}

impl Default for HnswBuild {
    /// pgvector's defaults.
    fn default() -> Self {
        HnswBuild {
            m: 16,
            ef_construction: 64,
        }
    }
}

impl HnswBuild {
    /// pgvector's limits: m 2 to 100, ef_construction 4 to 1,000 and at
    /// least twice m. When outside them: the parameter (`"m"` or
    /// `"ef_construction"`) and why.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if !(2..=100).contains(&self.m) {
            return Err(("m", format!("m is {}; pgvector takes 2 to 100", self.m)));
        }
        if !(4..=1000).contains(&self.ef_construction) || self.ef_construction < 2 * self.m {
            return Err((
                "ef_construction",
                format!(
                    "ef_construction is {}; pgvector takes 4 to 1000, and at least twice m ({})",
                    self.ef_construction,
                    2 * self.m
                ),
            ));
        }
        Ok(())
    }

    /// The cosine index on `conversation_chunks.embedding`. Search code
    /// orders by `embedding <=> $1` (cosine distance) to use it. The
    /// parameters are integers, checked: safe to format into the DDL.
    fn create_statement(&self) -> String {
        format!(
            "CREATE INDEX IF NOT EXISTS {HNSW_INDEX} \
             ON conversation_chunks USING hnsw (embedding vector_cosine_ops) \
             WITH (m = {}, ef_construction = {})",
            self.m, self.ef_construction
        )
    }
}

/// pgvector indexes `vector` columns of at most 2,000 dimensions with HNSW.
pub const HNSW_MAX_DIMENSIONS: usize = 2000;

/// Serialises [`ensure_vector_column`] between instances sharing a database
/// (an arbitrary constant: "convstor" in ASCII; sqlx's migrator uses a key
/// derived from the database name, so they do not collide).
pub(crate) const SCHEMA_LOCK_KEY: i64 = 0x636f_6e76_7374_6f72;

/// Makes `conversation_chunks.embedding` a `vector(dims)` column with a
/// cosine HNSW index built with `hnsw`.
///
/// - No dimension yet (fresh database): checks that stored vectors, if any,
///   have `dims` dimensions, then `ALTER ... TYPE vector(dims)`.
/// - Already `vector(dims)`: nothing to alter.
/// - Another dimension: [`StoreError::Schema`] saying what the database
///   holds and what the operator can do.
///
/// Then creates the index if it is missing. Everything runs in one
/// transaction under an advisory lock, so instances starting together do it
/// once and the others wait and find it done.
pub async fn ensure_vector_column(
    pool: &PgPool,
    dims: usize,
    hnsw: HnswBuild,
) -> Result<(), StoreError> {
    hnsw.check()
        .map_err(|(_, reason)| StoreError::Schema(format!("the HNSW index: {reason}")))?;
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

    match column_dimensions(&mut tx).await? {
        None => fix_dimensions(&mut tx, dims).await?,
        Some(current) if current == dims => {}
        Some(current) => {
            let model = stored_model(&mut tx).await?;
            return Err(dimension_mismatch(current, dims, model.as_deref()));
        }
    }

    let index_exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(HNSW_INDEX)
        .fetch_one(&mut *tx)
        .await?;
    if !index_exists {
        tracing::info!(
            index = HNSW_INDEX,
            dimensions = dims,
            "Creating the HNSW index on conversation_chunks.embedding"
        );
        // Checking first instead of relying on IF NOT EXISTS alone: CREATE
        // INDEX takes a SHARE lock on the table even when the index exists,
        // which would stall other instances' writes at every start.
        sqlx::query(sqlx::AssertSqlSafe(hnsw.create_statement()))
            .execute(&mut *tx)
            .await?;
    } else if let Some(built) = index_build(&mut tx).await?
        && built != hnsw
    {
        tracing::warn!(
            index = HNSW_INDEX,
            built_m = built.m,
            built_ef_construction = built.ef_construction,
            configured_m = hnsw.m,
            configured_ef_construction = hnsw.ef_construction,
            "The HNSW index was built with other parameters than database.hnsw_m and \
             database.hnsw_ef_construction; it keeps them. To rebuild it with the configured \
             ones, DROP INDEX it and restart convstore, which builds it again at start-up"
        );
    }
    tx.commit().await?;
    Ok(())
}

/// The build parameters of the existing HNSW index, from its storage
/// options (pgvector's defaults for an option not given).
async fn index_build(conn: &mut PgConnection) -> Result<Option<HnswBuild>, StoreError> {
    let options: Option<Vec<String>> = sqlx::query_scalar(
        "SELECT coalesce(reloptions, '{}'::text[]) FROM pg_class WHERE oid = to_regclass($1)",
    )
    .bind(HNSW_INDEX)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(options.map(|options| {
        let mut build = HnswBuild::default();
        for option in options {
            match option.split_once('=') {
                Some(("m", v)) => build.m = v.parse().unwrap_or(build.m),
                Some(("ef_construction", v)) => {
                    build.ef_construction = v.parse().unwrap_or(build.ef_construction);
                }
                _ => {}
            }
        }
        build
    }))
}

/// Name of the GIN full-text index on `conversation_chunks.content_tsv`
/// (migration 0008; rebuilt here for another `search.language`).
pub const TEXT_INDEX: &str = "conversation_chunks_content_fts_idx";

/// Makes the full-text index of lexical search use the text search
/// configuration `language` (`search.language`): checks that the server
/// has it, and when the index is missing or built for another
/// configuration, (re)builds it. Same transaction and advisory lock as
/// [`ensure_vector_column`], so instances starting together do it once.
///
/// The index is on the stored column `content_tsv`, generated as
/// `to_tsvector('<language>'::regconfig, content)`
/// ([`crate::search::TextSearchLanguage::tsvector`]); another language
/// regenerates the column (a rewrite of the chunks) and the index.
pub async fn ensure_text_index(
    pool: &PgPool,
    language: &crate::search::TextSearchLanguage,
) -> Result<(), StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(SCHEMA_LOCK_KEY)
        .execute(&mut *tx)
        .await?;
    let known: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_ts_config WHERE cfgname = $1)")
            .bind(language.as_str())
            .fetch_one(&mut *tx)
            .await?;
    if !known {
        let available: Vec<String> =
            sqlx::query_scalar("SELECT cfgname::text FROM pg_ts_config ORDER BY cfgname")
                .fetch_all(&mut *tx)
                .await?;
        return Err(StoreError::Schema(format!(
            "search.language is {:?}, which this PostgreSQL has no text search configuration              for; it has: {}",
            language.as_str(),
            available.join(", ")
        )));
    }
    // The stored column's generation expression (migration 0008).
    let expression: Option<String> = sqlx::query_scalar(
        "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d \
         JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum \
         WHERE d.adrelid = 'conversation_chunks'::regclass AND a.attname = 'content_tsv' \
           AND NOT a.attisdropped",
    )
    .fetch_optional(&mut *tx)
    .await?;
    let wanted = format!("to_tsvector('{}'::regconfig", language.as_str());
    let current = expression.as_deref().is_some_and(|e| e.contains(&wanted));
    let indexed: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(TEXT_INDEX)
        .fetch_one(&mut *tx)
        .await?;
    if !current {
        tracing::info!(
            language = language.as_str(),
            "Regenerating conversation_chunks.content_tsv and its full-text index for search.language"
        );
        // PostgreSQL 16 cannot change a generation expression in place:
        // the column is dropped and added again (one rewrite).
        for ddl in [
            format!("DROP INDEX IF EXISTS {TEXT_INDEX}"),
            "ALTER TABLE conversation_chunks DROP COLUMN IF EXISTS content_tsv".to_string(),
            format!(
                "ALTER TABLE conversation_chunks ADD COLUMN content_tsv tsvector \
                 GENERATED ALWAYS AS ({}) STORED",
                language.tsvector("content")
            ),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(ddl))
                .execute(&mut *tx)
                .await?;
        }
    }
    if !current || !indexed {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE INDEX {TEXT_INDEX} ON conversation_chunks USING gin (content_tsv)"
        )))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// The column's fixed dimension (`vector(N)` → N), or `None` for a bare
/// `vector`.
pub(crate) async fn column_dimensions(
    conn: &mut PgConnection,
) -> Result<Option<usize>, StoreError> {
    let typmod: Option<i32> = sqlx::query_scalar(
        "SELECT atttypmod FROM pg_attribute \
         WHERE attrelid = 'conversation_chunks'::regclass \
           AND attname = 'embedding' AND NOT attisdropped",
    )
    .fetch_optional(&mut *conn)
    .await?;
    let Some(typmod) = typmod else {
        return Err(StoreError::Schema(
            "conversation_chunks has no embedding column: the migrations have not run \
             (run `convstore migrate`)"
                .into(),
        ));
    };
    // pgvector stores the dimension itself as the typmod; -1 means none.
    Ok(usize::try_from(typmod).ok().filter(|d| *d > 0))
}

async fn fix_dimensions(conn: &mut PgConnection, dims: usize) -> Result<(), StoreError> {
    // The ALTER below would fail on a stored vector of another size too, but
    // with "expected N dimensions, not M"; say instead what it means.
    let other: Option<i32> = sqlx::query_scalar(
        "SELECT vector_dims(embedding) FROM conversation_chunks \
         WHERE embedding IS NOT NULL AND vector_dims(embedding) <> $1 LIMIT 1",
    )
    .bind(i32::try_from(dims).unwrap_or(i32::MAX))
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(other) = other {
        let model = stored_model(conn).await?;
        let current = usize::try_from(other).unwrap_or(0);
        return Err(dimension_mismatch(current, dims, model.as_deref()));
    }
    tracing::info!(
        dimensions = dims,
        "Fixing conversation_chunks.embedding to vector({dims})"
    );
    // A type modifier cannot be a bind parameter; `dims` is a checked
    // integer (1..=2000), so formatting it in is safe.
    let ddl = format!("ALTER TABLE conversation_chunks ALTER COLUMN embedding TYPE vector({dims})");
    sqlx::query(sqlx::AssertSqlSafe(ddl))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A model that produced the stored vectors, to name it in the error.
pub(crate) async fn stored_model(conn: &mut PgConnection) -> Result<Option<String>, StoreError> {
    let model = sqlx::query_scalar(
        "SELECT model FROM conversation_chunks WHERE embedding IS NOT NULL LIMIT 1",
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(model)
}

fn dimension_mismatch(stored: usize, configured: usize, model: Option<&str>) -> StoreError {
    let by = model.map_or(String::new(), |m| format!(" (from model `{m}`)"));
    StoreError::Schema(format!(
        "the database holds {stored}-dimensional vectors{by}; embedding.dimensions is \
         {configured}. Vectors of different models cannot share one index. Either configure \
         the model that produced them (embedding.model, embedding.dimensions = {stored}), \
         or use a new database (another database.url, or another state_dir in managed mode)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatch_message_says_what_and_what_to_do() {
        let text = dimension_mismatch(384, 768, Some("all-minilm")).to_string();
        assert!(text.contains("384-dimensional"), "{text}");
        assert!(text.contains("embedding.dimensions is 768"), "{text}");
        assert!(text.contains("all-minilm"), "{text}");
        assert!(text.contains("database.url"), "{text}");
    }
}
