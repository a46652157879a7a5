//! Dead letters of the shared intake: changes that can never be applied,
//! kept whole for an operator (migration `0005_dead_letters.sql`).

use crate::{Store, StoreError};

/// One change the shared intake gave up on.
#[derive(Debug, Clone)]
pub struct DeadLetter<'a> {
    /// `""` when the payload is not a change.
    pub user_id: &'a str,
    pub conversation_key: Option<&'a str>,
    pub stream: &'a str,
    pub stream_sequence: u64,
    pub deliveries: i64,
    pub payload: &'a [u8],
    pub reason: &'a str,
}

impl Store {
    /// Records `letter`; the caller terminates it in the stream after.
    pub async fn record_dead_letter(&self, letter: &DeadLetter<'_>) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO dead_letters \
             (user_id, conversation_key, stream, stream_sequence, deliveries, payload, reason) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(letter.user_id)
        .bind(letter.conversation_key)
        .bind(letter.stream)
        .bind(i64::try_from(letter.stream_sequence).unwrap_or(i64::MAX))
        .bind(i32::try_from(letter.deliveries).unwrap_or(i32::MAX))
        .bind(letter.payload)
        .bind(letter.reason)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// How many dead letters are kept.
    pub async fn dead_letter_count(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}
