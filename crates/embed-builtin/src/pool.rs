//! A bounded pool for CPU-bound model work, off the async runtime.
//!
//! Inference takes milliseconds to seconds of CPU; on a runtime worker it
//! would stall every socket the worker serves. Jobs run on tokio's blocking
//! threads, at most `size` at once (a semaphore): more would only
//! time-slice the same cores and grow memory. A job whose caller gave up
//! still runs to its end and keeps its slot until then, so the bound holds.

use std::sync::Arc;

use tokio::sync::Semaphore;

use convstore_embed::EmbedError;

#[derive(Debug, Clone)]
pub struct InferencePool {
    permits: Arc<Semaphore>,
    size: usize,
}

impl InferencePool {
    /// A pool running at most `size` (at least 1) jobs at once.
    pub fn new(size: usize) -> Self {
        let size = size.max(1);
        Self {
            permits: Arc::new(Semaphore::new(size)),
            size,
        }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Runs `job` on a blocking thread once a slot is free.
    pub async fn run<T, F>(&self, job: F) -> Result<T, EmbedError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let permit =
            self.permits.clone().acquire_owned().await.map_err(|_| {
                EmbedError::Unreachable("builtin model: inference pool closed".into())
            })?;
        tokio::task::spawn_blocking(move || {
            let _slot = permit;
            job()
        })
        .await
        .map_err(|e| {
            EmbedError::ModelUnavailable(format!("builtin model: inference job failed: {e}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn never_more_jobs_at_once_than_its_size() {
        let pool = InferencePool::new(2);
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let jobs = (0..8).map(|_| {
            let (running, most) = (running.clone(), most.clone());
            pool.run(move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(20));
                running.fetch_sub(1, Ordering::SeqCst);
            })
        });
        for result in futures::future::join_all(jobs).await {
            result.expect("job ran");
        }
        assert!(
            most.load(Ordering::SeqCst) <= 2,
            "{most:?} jobs ran at once"
        );
    }

    #[tokio::test]
    async fn a_panicking_job_is_an_error_not_a_crash() {
        let pool = InferencePool::new(1);
        let result = pool.run(|| -> u32 { panic!("boom") }).await;
        assert!(matches!(result, Err(EmbedError::ModelUnavailable(_))));
        assert_eq!(
            pool.run(|| 7).await.ok(),
            Some(7),
            "the slot was given back"
        );
    }
}
