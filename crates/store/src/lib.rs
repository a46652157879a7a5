//! Storage: migrations, the vector index, the batch writer, and the managed
//! PostgreSQL cluster.
//!
//! [`Store`] is the one door to the database for every other stage: workers
//! call [`Store::write_batch`], the API reads through [`read`], start-up
//! calls [`Store::migrate`] and [`Store::ensure_vector_column`]. Nothing here
//! knows about HTTP or the queue.
//!
//! Start-up order: [`Store::connect`] → [`Store::migrate`] (embedded
//! migrations from `migrations/`, under sqlx's advisory lock, so several
//! instances may start at once; then [`layout::ensure_layout`], the plain
//! or hash-partitioned tables of `database.partitions`) →
//! [`Store::prepare_vectors`] (fixes the vector dimension and builds the
//! HNSW index, also under a lock; starts a change of model when the
//! database holds another model's vectors, [`models`]).
pub mod backfill;
pub mod copy;
pub mod dead_letters;
pub mod embedding_cache;
pub mod layout;
pub mod lifecycle;
pub mod managed;
pub mod managed_watch;
pub mod models;
pub mod read;
pub mod retention;
pub mod schema;
pub mod search;
pub mod settings;
pub mod write;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use uuid::Uuid;

use crate::settings::{DatabaseSettings, WriteMethod};

pub use read::{ChunkCounts, StoreCounts, StoredChunk, StoredConversation};
pub use write::{Removal, WriteOutcome};

/// The migrations in `migrations/`, compiled into the binary.
///
/// Note: sqlx's macro tracks the files it embedded; a *new* migration file
/// is picked up on the next rebuild of this crate (touch this file, or a
/// `build.rs` with `cargo:rerun-if-changed=migrations`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// Why a database operation failed, sorted by what the caller should do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached, the connection broke, the server is
    /// shutting down or out of resources, or the transaction lost a
    /// deadlock/serialization race: the same call may succeed later.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// The database refused the data (a constraint or a value it cannot
    /// hold). Retrying the same rows fails the same way.
    #[error("database rejected the data: {0}")]
    Rejected(#[source] sqlx::Error),
    /// One conversation of a batch cannot be stored as it is; checked before
    /// the database is touched, so the rest of the batch can be retried
    /// without it.
    #[error("conversation {id} cannot be stored: {reason}")]
    InvalidConversation { id: Uuid, reason: String },
    /// The database's schema does not fit the configuration (for example
    /// the vector dimension); an operator has to act.
    #[error("{0}")]
    Schema(String),
    /// Applying the embedded migrations failed.
    #[error("cannot apply database migrations: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// Anything else: a bad URL, missing privileges, a bug in a query.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
}

impl StoreError {
    /// True when waiting and trying the same operation again can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if is_unavailable(&e) {
            return Self::Unavailable(e);
        }
        let is_data = match &e {
            sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|c| c.starts_with("22") || c.starts_with("23")),
            sqlx::Error::Encode(_) => true,
            _ => false,
        };
        if is_data {
            Self::Rejected(e)
        } else {
            Self::Database(e)
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        match e {
            sqlx::migrate::MigrateError::Execute(inner)
            | sqlx::migrate::MigrateError::ExecuteMigration(inner, _)
                if is_unavailable(&inner) =>
            {
                Self::Unavailable(inner)
            }
            other => Self::Migrate(other),
        }
    }
}

/// Errors after which a later attempt can succeed: the transport, the pool,
/// and the SQLSTATE classes PostgreSQL uses for "not now".
fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| is_transient_sqlstate(&c)),
        _ => false,
    }
}

fn is_transient_sqlstate(code: &str) -> bool {
    // 08 connection exception, 53 insufficient resources (disk full, too
    // many connections), 58 system error (I/O); 57P01..57P03 admin or crash
    // shutdown / cannot connect now; 40001 serialization failure, 40P01
    // deadlock; 55P03 lock not available.
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("58")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "40001" | "40P01" | "55P03"
        )
}

/// A pool of connections plus how batches are written.
///
/// Cheap to clone (the pool is reference-counted).
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    write_method: WriteMethod,
    /// The vector dimension the column was fixed to, once
    /// [`Store::ensure_vector_column`] ran (0 before); batches are checked
    /// against it before the database sees them. Shared by clones.
    dimensions: Arc<AtomicUsize>,
    /// `database.partitions`: the layout [`Store::migrate`] makes on an
    /// empty database (0 = plain tables, or whatever is found).
    partitions: u32,
    /// How the HNSW index is built when it is created.
    hnsw: schema::HnswBuild,
}

impl Store {
    /// Opens a pool of up to `pool_size` connections and checks one.
    ///
    /// A refused connection is retried until `connect_timeout` (the server
    /// may still be starting); a bad URL or password fails at once. The
    /// write method starts as [`WriteMethod::Copy`].
    pub async fn connect(
        url: &str,
        pool_size: u32,
        connect_timeout: Duration,
    ) -> Result<Store, StoreError> {
        let options = PgConnectOptions::from_str(url)
            .map_err(StoreError::Database)?
            .application_name("convstore");
        let pool = PgPoolOptions::new()
            .max_connections(pool_size.max(1))
            .acquire_timeout(connect_timeout)
            .connect_with(options)
            .await?;
        Ok(Store {
            pool,
            write_method: WriteMethod::Copy,
            dimensions: Arc::default(),
            partitions: 0,
            hnsw: schema::HnswBuild::default(),
        })
    }

    /// [`Store::connect`] with the `[database]` settings (pool size, connect
    /// timeout, write method). `url` is passed separately because in managed
    /// mode it comes from the managed cluster, not from the settings.
    pub async fn connect_with(url: &str, settings: &DatabaseSettings) -> Result<Store, StoreError> {
        let timeout = Duration::from_millis(settings.connect_timeout_ms.get());
        let store = Self::connect(url, settings.pool_size.get(), timeout).await?;
        Ok(store
            .with_write_method(settings.write_method)
            .with_partitions(settings.partitions)
            .with_hnsw(settings.hnsw()))
    }

    /// Wraps an existing pool (tests, tools).
    pub fn from_pool(pool: PgPool) -> Store {
        Store {
            pool,
            write_method: WriteMethod::Copy,
            dimensions: Arc::default(),
            partitions: 0,
            hnsw: schema::HnswBuild::default(),
        }
    }

    /// Chooses how chunk rows are written (see [`write`]).
    pub fn with_write_method(mut self, method: WriteMethod) -> Self {
        self.write_method = method;
        self
    }

    /// Chooses the layout [`Store::migrate`] makes: `database.partitions`
    /// (see [`layout`]).
    pub fn with_partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions;
        self
    }

    /// Chooses the build parameters of the HNSW index when it is created
    /// (`database.hnsw_m`, `database.hnsw_ef_construction`).
    pub fn with_hnsw(mut self, hnsw: schema::HnswBuild) -> Self {
        self.hnsw = hnsw;
        self
    }

    pub fn write_method(&self) -> WriteMethod {
        self.write_method
    }

    /// The vector dimension fixed by [`Store::ensure_vector_column`], if it ran.
    pub fn dimensions(&self) -> Option<usize> {
        Some(self.dimensions.load(Ordering::Relaxed)).filter(|d| *d > 0)
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies the embedded migrations that are not applied yet, then makes
    /// (or checks) the table layout of `database.partitions`
    /// ([`layout::ensure_layout`]) and returns it. Safe to run from several
    /// instances at once (sqlx holds an advisory lock, the layout step the
    /// schema lock).
    pub async fn migrate(&self) -> Result<layout::Layout, StoreError> {
        MIGRATOR.run(&self.pool).await?;
        layout::ensure_layout(&self.pool, self.partitions).await
    }

    /// The layout of the tables now (plain or hash-partitioned).
    pub async fn layout(&self) -> Result<layout::Layout, StoreError> {
        let mut conn = self.pool.acquire().await?;
        layout::current_layout(&mut conn).await
    }

    /// Fixes `conversation_chunks.embedding` to `vector(dims)` and creates
    /// the HNSW index (see [`schema::ensure_vector_column`]); remembers
    /// `dims` so that [`Store::write_batch`] checks vectors before sending.
    pub async fn ensure_vector_column(&self, dims: usize) -> Result<(), StoreError> {
        schema::ensure_vector_column(&self.pool, dims, self.hnsw).await?;
        self.set_dimensions(dims);
        Ok(())
    }

    fn set_dimensions(&self, dims: usize) {
        self.dimensions.store(dims, Ordering::Relaxed);
    }

    /// Builds the full-text index of lexical search for `language` when it
    /// is missing or built for another (see [`schema::ensure_text_index`]).
    pub async fn ensure_text_index(
        &self,
        language: &search::TextSearchLanguage,
    ) -> Result<(), StoreError> {
        schema::ensure_text_index(&self.pool, language).await
    }

    /// One round trip: for `/readyz`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Closes every connection; waits for checked-out ones to come back.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}
