//! Retention's database side: delete conversations past their age, and
//! tombstones past theirs, in bounded batches.
//!
//! A conversation's age is taken from `created_at`, else `received_at`
//! (the expression the indexes of migration 0003 are built on, so each
//! batch walks an index from the oldest row instead of scanning the
//! table). Its chunks go with it (`ON DELETE CASCADE`).
//!
//! Each batch is its own short transaction: at most `limit` rows are
//! locked, and never for longer than one delete. Safe with several
//! instances on one database:
//! - rows are picked `FOR UPDATE SKIP LOCKED`, so a reaper never waits for
//!   (or deletes under) a row a writer or another reaper holds;
//! - each batch first takes a transaction-scoped advisory lock without
//!   waiting; when another instance holds it, that instance is reaping
//!   now and this one stops its run ([`BatchOutcome::Busy`]): one reaper at
//!   a time, and nothing to release if a process dies (the lock ends with
//!   its transaction).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Datelike, TimeDelta, Utc};

use super::{Store, StoreError};

/// What to keep, parsed from `[retention]`
/// ([`crate::settings::RetentionSettings::policy`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RetentionPolicy {
    /// Every channel without an override; `None` = kept forever.
    pub max_age: Option<Duration>,
    /// Overrides by channel; `None` = that channel is kept forever.
    pub channels: BTreeMap<String, Option<Duration>>,
    /// `None` = tombstones are kept forever.
    pub tombstone_max_age: Option<Duration>,
    /// How often the reaper runs.
    pub interval: Duration,
}

/// One thing a run deletes, with the cutoff computed at the run's start.
#[derive(Debug, Clone, PartialEq)]
pub enum ReapTarget {
    /// Conversations of one channel older than `cutoff`.
    Channel {
        channel: String,
        cutoff: DateTime<Utc>,
    },
    /// Conversations of every channel but `except` (those with an
    /// override) older than `cutoff`.
    OtherChannels {
        except: Vec<String>,
        cutoff: DateTime<Utc>,
    },
    /// Tombstones created before `cutoff`.
    Tombstones { cutoff: DateTime<Utc> },
}

impl ReapTarget {
    /// Whether this target deletes conversations (not tombstones).
    pub fn is_conversations(&self) -> bool {
        !matches!(self, ReapTarget::Tombstones { .. })
    }
}

impl RetentionPolicy {
    /// What a run starting at `now` deletes: the channel overrides, the
    /// default rule, then tombstones. Empty when everything is kept.
    pub fn targets(&self, now: DateTime<Utc>) -> Vec<ReapTarget> {
        let mut targets = Vec::new();
        for (channel, age) in &self.channels {
            if let Some(cutoff) = age.and_then(|a| cutoff(now, a)) {
                targets.push(ReapTarget::Channel {
                    channel: channel.clone(),
                    cutoff,
                });
            }
        }
        if let Some(cutoff) = self.max_age.and_then(|a| cutoff(now, a)) {
            targets.push(ReapTarget::OtherChannels {
                except: self.channels.keys().cloned().collect(),
                cutoff,
            });
        }
        if let Some(cutoff) = self.tombstone_max_age.and_then(|a| cutoff(now, a)) {
            targets.push(ReapTarget::Tombstones { cutoff });
        }
        targets
    }
}

/// `now - age`, or `None` when that is before anything PostgreSQL can
/// hold (4713 BC): nothing is that old, and the database would refuse the
/// value.
fn cutoff(now: DateTime<Utc>, age: Duration) -> Option<DateTime<Utc>> {
    let cutoff = now.checked_sub_signed(TimeDelta::from_std(age).ok()?)?;
    (cutoff.year() > -4700).then_some(cutoff)
}

/// What one batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOutcome {
    Deleted(u64),
    /// Another instance is reaping now; this run should stop.
    Busy,
}

/// The advisory lock key of the reaper (`pg_try_advisory_xact_lock`):
/// "convreap" in ASCII, apart from sqlx's migration lock.
pub const REAPER_LOCK: i64 = 0x636f_6e76_7265_6170;

/// Conversations of channel `$1` older than `$2`, oldest first, `$3` at
/// most. The pick is a `MATERIALIZED` CTE (at most `$3` rows, locked as
/// picked); `= ANY(ARRAY(...))` makes its ids and users init plans and the
/// delete a lookup by key `(user_id, id)`, whatever the planner guesses of
/// the pick's size (a join on the CTE was planned as a scan of the whole
/// table). A row id is one row (`write`), so the two lists select exactly
/// the picked rows; naming `user_id` lets partitions (shards) be pruned.
pub const REAP_CHANNEL_SQL: &str = "\
WITH picked AS MATERIALIZED (
    SELECT user_id, id FROM conversations
    WHERE channel = $1 AND coalesce(created_at, received_at) < $2
    ORDER BY coalesce(created_at, received_at)
    LIMIT $3
    FOR UPDATE SKIP LOCKED)
DELETE FROM conversations
WHERE id = ANY(ARRAY(SELECT id FROM picked))
  AND user_id = ANY(ARRAY(SELECT user_id FROM picked))";

/// Conversations of every channel but those in `$1` older than `$2`.
pub const REAP_OTHER_CHANNELS_SQL: &str = "\
WITH picked AS MATERIALIZED (
    SELECT user_id, id FROM conversations
    WHERE channel <> ALL($1::text[]) AND coalesce(created_at, received_at) < $2
    ORDER BY coalesce(created_at, received_at)
    LIMIT $3
    FOR UPDATE SKIP LOCKED)
DELETE FROM conversations
WHERE id = ANY(ARRAY(SELECT id FROM picked))
  AND user_id = ANY(ARRAY(SELECT user_id FROM picked))";

/// Tombstones created before `$1`. By `ctid`: the key is two columns, and
/// the rows are locked by the same statement, so their `ctid` holds.
pub const REAP_TOMBSTONES_SQL: &str = "\
DELETE FROM tombstones WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM tombstones
    WHERE created_at < $1
    ORDER BY created_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED))";

impl Store {
    /// Deletes at most `limit` rows of `target` in one transaction.
    pub async fn reap_batch(
        &self,
        target: &ReapTarget,
        limit: u32,
    ) -> Result<BatchOutcome, StoreError> {
        let limit = i64::from(limit.max(1));
        let mut tx = self.pool().begin().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(REAPER_LOCK)
            .fetch_one(&mut *tx)
            .await?;
        if !locked {
            tx.rollback().await?;
            return Ok(BatchOutcome::Busy);
        }
        let query = match target {
            ReapTarget::Channel { channel, cutoff } => sqlx::query(REAP_CHANNEL_SQL)
                .bind(channel)
                .bind(cutoff)
                .bind(limit),
            ReapTarget::OtherChannels { except, cutoff } => sqlx::query(REAP_OTHER_CHANNELS_SQL)
                .bind(except)
                .bind(cutoff)
                .bind(limit),
            ReapTarget::Tombstones { cutoff } => {
                sqlx::query(REAP_TOMBSTONES_SQL).bind(cutoff).bind(limit)
            }
        };
        let deleted = query.execute(&mut *tx).await?.rows_affected();
        tx.commit().await?;
        Ok(BatchOutcome::Deleted(deleted))
    }

    /// Deletes everything of `target`, batch after batch, until a batch
    /// comes back short; `on_batch` hears each batch's count as it
    /// commits. `Ok(false)` when it stopped because another instance is
    /// reaping.
    pub async fn reap(
        &self,
        target: &ReapTarget,
        limit: u32,
        mut on_batch: impl FnMut(u64),
    ) -> Result<bool, StoreError> {
        loop {
            match self.reap_batch(target, limit).await? {
                BatchOutcome::Busy => return Ok(false),
                BatchOutcome::Deleted(n) => {
                    if n > 0 {
                        on_batch(n);
                    }
                    if n < u64::from(limit.max(1)) {
                        return Ok(true);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(n: u64) -> Duration {
        Duration::from_secs(n * 86_400)
    }

    #[test]
    fn targets_follow_the_policy() {
        let now = Utc::now();
        let keep = RetentionPolicy {
            max_age: None,
            channels: BTreeMap::new(),
            tombstone_max_age: None,
            interval: day(1),
        };
        assert!(keep.targets(now).is_empty());

        let policy = RetentionPolicy {
            max_age: Some(day(365)),
            channels: BTreeMap::from([("web".into(), Some(day(30))), ("legal".into(), None)]),
            tombstone_max_age: Some(day(90)),
            interval: day(1),
        };
        let targets = policy.targets(now);
        assert_eq!(
            targets,
            vec![
                ReapTarget::Channel {
                    channel: "web".into(),
                    cutoff: now - TimeDelta::days(30)
                },
                ReapTarget::OtherChannels {
                    // A channel kept forever is excluded from the default too.
                    except: vec!["legal".into(), "web".into()],
                    cutoff: now - TimeDelta::days(365)
                },
                ReapTarget::Tombstones {
                    cutoff: now - TimeDelta::days(90)
                },
            ]
        );
        assert!(targets[1].is_conversations());
        assert!(!targets[2].is_conversations());
    }

    #[test]
    fn an_age_beyond_postgresql_deletes_nothing() {
        let policy = RetentionPolicy {
            max_age: Some(day(100_000 * 365)),
            channels: BTreeMap::new(),
            tombstone_max_age: None,
            interval: day(1),
        };
        assert!(policy.targets(Utc::now()).is_empty());
    }
}
