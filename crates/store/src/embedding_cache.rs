//! The shared L2 embedding cache: the `embedding_cache` table, (model,
//! content hash) → vector, read on an L1 miss and filled after a backend
//! call. Every instance on the database shares it, and it survives
//! restarts, so a restarted or added instance starts warm and re-sent
//! conversations cost no backend call.
//!
//! Both operations are one statement per batch of texts. The cache is an
//! optimisation: callers treat its errors as misses (lookup) or log them
//! (fill) and carry on.

use std::collections::HashMap;

use pgvector::Vector;
use sqlx::Row;

use super::{Store, StoreError};
use convstore_core::model::ContentHash;

const LOOKUP: &str = "SELECT content_hash, embedding FROM embedding_cache \
     WHERE model = $1 AND content_hash = ANY($2::bytea[])";

/// `ON CONFLICT DO NOTHING`: another instance may have cached the same
/// text a moment ago; its vector is the same.
const FILL: &str = "INSERT INTO embedding_cache (model, content_hash, embedding) \
     SELECT $1, h, e FROM UNNEST($2::bytea[], $3::vector[]) AS t(h, e) \
     ON CONFLICT DO NOTHING";

impl Store {
    /// The cached vectors of `model` for these hashes (missing ones absent).
    pub async fn cache_lookup(
        &self,
        model: &str,
        hashes: &[ContentHash],
    ) -> Result<HashMap<ContentHash, Vec<f32>>, StoreError> {
        if hashes.is_empty() {
            return Ok(HashMap::new());
        }
        let keys: Vec<Vec<u8>> = hashes.iter().map(|h| h.to_vec()).collect();
        let rows = sqlx::query(LOOKUP)
            .bind(model)
            .bind(&keys)
            .fetch_all(&self.pool)
            .await?;
        let mut found = HashMap::with_capacity(rows.len());
        for row in rows {
            let hash: Vec<u8> = row.try_get("content_hash")?;
            let vector: Vector = row.try_get("embedding")?;
            if let Ok(hash) = ContentHash::try_from(hash.as_slice()) {
                found.insert(hash, vector.to_vec());
            }
        }
        Ok(found)
    }

    /// Caches `entries` for `model`; returns how many were new.
    ///
    /// Rows are inserted in hash order: two instances filling overlapping
    /// sets then wait for each other in the same order instead of
    /// deadlocking.
    pub async fn cache_fill(
        &self,
        model: &str,
        entries: &[(ContentHash, &[f32])],
    ) -> Result<u64, StoreError> {
        if entries.is_empty() {
            return Ok(0);
        }
        let mut sorted: Vec<&(ContentHash, &[f32])> = entries.iter().collect();
        sorted.sort_by_key(|entry| entry.0);
        sorted.dedup_by(|a, b| a.0 == b.0);
        let hashes: Vec<Vec<u8>> = sorted.iter().map(|(h, _)| h.to_vec()).collect();
        let vectors: Vec<Vector> = sorted
            .iter()
            .map(|(_, v)| Vector::from(v.to_vec()))
            .collect();
        let done = sqlx::query(FILL)
            .bind(model)
            .bind(&hashes)
            .bind(&vectors)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}
