//! The bounded in-memory queue between ingress and the batcher.
//!
//! Bounded twice: by item count (`queue.capacity`) and by bytes
//! (`queue.max_bytes`), since one huge conversation costs what a thousand
//! small ones do. Under the count bound sits an admission limit the daemon
//! moves with the measured store rate (`queue.max_backlog_seconds`,
//! [`crate::admission`]): items past it are refused as if the queue were
//! full. `try_push` hands the item back when there is no room, so the
//! caller can answer 429 instead of blocking; `push_timeout` waits for room
//! (`when_full = "block"`). Items leave only through `pop_batch`: nothing is
//! dropped, and `close` lets the consumer drain what is left.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Why an item was handed back.
#[derive(Debug)]
pub enum PushError<T> {
    /// No room now (count or bytes).
    Full(T),
    /// The item alone is larger than `max_bytes`: it can never fit.
    TooLarge(T),
    /// The queue is closed: the daemon is shutting down.
    Closed(T),
}

struct State<T> {
    items: VecDeque<(T, usize)>,
    bytes: usize,
    closed: bool,
}

pub struct BoundedQueue<T> {
    state: Mutex<State<T>>,
    capacity: usize,
    max_bytes: usize,
    /// Items admitted now: `capacity`, or fewer (never 0) while the store
    /// rate says more would wait too long ([`Self::set_admission_limit`]).
    admission_limit: AtomicUsize,
    /// Signalled when an item arrives or the queue closes (one consumer).
    item_added: Notify,
    /// Signalled when items leave, waking producers that wait for room.
    space_freed: Notify,
}

impl<T> BoundedQueue<T> {
    pub fn new(capacity: usize, max_bytes: usize) -> Self {
        Self {
            state: Mutex::new(State {
                items: VecDeque::with_capacity(capacity.min(65_536)),
                bytes: 0,
                closed: false,
            }),
            capacity,
            max_bytes,
            admission_limit: AtomicUsize::new(capacity),
            item_added: Notify::new(),
            space_freed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        // A panic while holding this lock cannot leave the deque half-updated
        // (every critical section is a few field updates), so poison is moot.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `state` has room for one more item of `bytes`.
    fn has_room(&self, state: &State<T>, bytes: usize) -> bool {
        state.items.len() < self.admission_limit() && state.bytes + bytes <= self.max_bytes
    }

    /// Appends `item`, accounted as `bytes`, if there is room now.
    pub fn try_push(&self, item: T, bytes: usize) -> Result<(), PushError<T>> {
        if bytes > self.max_bytes {
            return Err(PushError::TooLarge(item));
        }
        {
            let mut state = self.lock();
            if state.closed {
                return Err(PushError::Closed(item));
            }
            if !self.has_room(&state, bytes) {
                return Err(PushError::Full(item));
            }
            state.items.push_back((item, bytes));
            state.bytes += bytes;
        }
        self.item_added.notify_one();
        Ok(())
    }

    /// Appends `item`, waiting up to `timeout` for room.
    pub async fn push_timeout(
        &self,
        mut item: T,
        bytes: usize,
        timeout: Duration,
    ) -> Result<(), PushError<T>> {
        let deadline = Instant::now() + timeout;
        loop {
            // Register for the wake-up before checking, so a pop between the
            // check and the wait is not missed.
            let freed = self.space_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            match self.try_push(item, bytes) {
                Err(PushError::Full(back)) => item = back,
                other => return other,
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return self.try_push(item, bytes);
            }
        }
    }

    /// Waits until there is room for `bytes` (or the queue closed), or
    /// until `deadline`; false when the deadline passed first. For a
    /// producer that must not hold its item while it waits (the journal's
    /// append, whose lock cannot be held across a wait).
    pub async fn wait_for_room(&self, bytes: usize, deadline: Instant) -> bool {
        loop {
            // Register before checking, as in `push_timeout`.
            let freed = self.space_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let state = self.lock();
                if state.closed || self.has_room(&state, bytes) {
                    return true;
                }
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return false;
            }
        }
    }

    /// Waits for the first item, then gathers up to `max` items, returning
    /// when `max` are gathered or `max_wait` after the first arrived. `None`
    /// once the queue is closed and empty.
    pub async fn pop_batch(&self, max: usize, max_wait: Duration) -> Option<Vec<T>> {
        let mut batch = Vec::with_capacity(max);
        let mut deadline: Option<Instant> = None;
        loop {
            let added = self.item_added.notified();
            tokio::pin!(added);
            added.as_mut().enable();
            let closed = {
                let mut state = self.lock();
                let mut freed = 0;
                while batch.len() < max {
                    match state.items.pop_front() {
                        Some((item, bytes)) => {
                            freed += bytes;
                            batch.push(item);
                        }
                        None => break,
                    }
                }
                state.bytes -= freed;
                state.closed
            };
            if !batch.is_empty() {
                self.space_freed.notify_waiters();
            }
            if batch.len() >= max || (closed && self.is_empty()) {
                return if batch.is_empty() { None } else { Some(batch) };
            }
            if batch.is_empty() {
                added.await;
                continue;
            }
            let until = *deadline.get_or_insert_with(|| Instant::now() + max_wait);
            if closed || tokio::time::timeout_at(until, added).await.is_err() {
                // Deadline (or shutdown): take whatever else is already there.
                let mut state = self.lock();
                let mut freed = 0;
                while batch.len() < max {
                    match state.items.pop_front() {
                        Some((item, bytes)) => {
                            freed += bytes;
                            batch.push(item);
                        }
                        None => break,
                    }
                }
                state.bytes -= freed;
                drop(state);
                self.space_freed.notify_waiters();
                return Some(batch);
            }
        }
    }

    /// Runs `f` over the queued items, in order, under the queue's lock
    /// (keep it short: producers and the batcher wait meanwhile).
    pub fn inspect<R>(&self, f: impl FnOnce(&mut dyn Iterator<Item = &T>) -> R) -> R {
        let state = self.lock();
        let mut items = state.items.iter().map(|(item, _)| item);
        f(&mut items)
    }

    /// Takes every queued item `matches` selects out of the queue, in
    /// order (a delete or erasure withdrawing what it covers); the rest
    /// keep their order.
    pub fn remove_where(&self, mut matches: impl FnMut(&T) -> bool) -> Vec<T> {
        let removed = {
            let mut state = self.lock();
            let mut removed = Vec::new();
            let mut freed = 0;
            let items = std::mem::take(&mut state.items);
            for (item, bytes) in items {
                if matches(&item) {
                    freed += bytes;
                    removed.push(item);
                } else {
                    state.items.push_back((item, bytes));
                }
            }
            state.bytes -= freed;
            removed
        };
        if !removed.is_empty() {
            self.space_freed.notify_waiters();
        }
        removed
    }

    /// Refuses new items; what is queued can still be popped.
    pub fn close(&self) {
        self.lock().closed = true;
        self.item_added.notify_one();
        self.space_freed.notify_waiters();
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    pub fn len(&self) -> usize {
        self.lock().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().items.is_empty()
    }

    /// `f` of the item queued the longest (the next out), if any.
    pub fn oldest<R>(&self, f: impl FnOnce(&T) -> R) -> Option<R> {
        self.lock().items.front().map(|(item, _)| f(item))
    }

    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many items the queue admits now (at most [`Self::capacity`]).
    pub fn admission_limit(&self) -> usize {
        self.admission_limit.load(Ordering::Relaxed)
    }

    /// Admits at most `items` (clamped to 1..=capacity) from now on. What
    /// is queued stays; a raise wakes producers waiting for room.
    pub fn set_admission_limit(&self, items: usize) {
        let items = items.clamp(1, self.capacity.max(1));
        let before = self.admission_limit.swap(items, Ordering::Relaxed);
        if items > before {
            self.space_freed.notify_waiters();
        }
    }

    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn the_admission_limit_refuses_like_a_full_queue_and_a_raise_wakes_waiters() {
        let q = Arc::new(BoundedQueue::new(10, 1_000));
        q.set_admission_limit(2);
        q.try_push(1, 1).unwrap();
        q.try_push(2, 1).unwrap();
        assert!(matches!(q.try_push(3, 1), Err(PushError::Full(3))));
        assert_eq!(q.admission_limit(), 2);
        // Clamped: never 0 (nothing could ever enter), never past capacity.
        q.set_admission_limit(0);
        assert_eq!(q.admission_limit(), 1);
        q.set_admission_limit(50);
        assert_eq!(q.admission_limit(), 10);
        q.set_admission_limit(2);
        // A producer waiting for room gets in once the limit rises, with
        // nothing popped.
        let waiting = {
            let q = q.clone();
            tokio::spawn(async move { q.push_timeout(3, 1, Duration::from_secs(30)).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        q.set_admission_limit(3);
        let pushed = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("woken by the raise")
            .expect("task");
        assert!(pushed.is_ok());
        assert_eq!(q.len(), 3);
    }

    #[test]
    fn remove_where_takes_out_what_matches_and_frees_its_room() {
        let q = BoundedQueue::new(4, 100);
        for (item, bytes) in [(1, 10), (2, 20), (3, 30), (4, 40)] {
            q.try_push(item, bytes).unwrap();
        }
        assert_eq!(q.remove_where(|i| i % 2 == 0), vec![2, 4]);
        assert_eq!((q.len(), q.bytes()), (2, 40));
        q.try_push(5, 60).unwrap();
        assert_eq!(q.remove_where(|_| false), Vec::<i32>::new());
    }

    #[tokio::test]
    async fn full_by_count_hands_item_back() {
        let q = BoundedQueue::new(2, 1000);
        q.try_push(1, 1).unwrap();
        q.try_push(2, 1).unwrap();
        match q.try_push(3, 1) {
            Err(PushError::Full(3)) => {}
            other => panic!("expected Full(3), got {other:?}"),
        }
        assert_eq!(q.len(), 2);
    }

    #[tokio::test]
    async fn full_by_bytes() {
        let q = BoundedQueue::new(100, 10);
        q.try_push("a", 6).unwrap();
        assert!(matches!(q.try_push("b", 5), Err(PushError::Full("b"))));
        assert!(matches!(q.try_push("c", 11), Err(PushError::TooLarge("c"))));
        q.try_push("d", 4).unwrap();
        assert_eq!(q.bytes(), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn batch_closes_at_max_size() {
        let q = BoundedQueue::new(100, 1000);
        for i in 0..5 {
            q.try_push(i, 1).unwrap();
        }
        let batch = q.pop_batch(3, Duration::from_secs(10)).await.unwrap();
        assert_eq!(batch, vec![0, 1, 2]);
        assert_eq!(q.len(), 2);
        assert_eq!(q.bytes(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn batch_closes_after_max_wait_from_first_item() {
        let q = Arc::new(BoundedQueue::new(100, 1000));
        q.try_push(1, 1).unwrap();
        let started = Instant::now();
        let producer = {
            let q = q.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(5)).await;
                q.try_push(2, 1).unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
                q.try_push(3, 1).unwrap();
            })
        };
        let batch = q.pop_batch(10, Duration::from_millis(20)).await.unwrap();
        assert_eq!(batch, vec![1, 2]);
        assert_eq!(started.elapsed(), Duration::from_millis(20));
        producer.await.unwrap();
        assert_eq!(q.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn blocked_push_succeeds_when_room_frees() {
        let q = Arc::new(BoundedQueue::new(1, 1000));
        q.try_push(1, 1).unwrap();
        let pusher = {
            let q = q.clone();
            tokio::spawn(async move { q.push_timeout(2, 1, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            q.pop_batch(1, Duration::from_millis(1)).await,
            Some(vec![1])
        );
        assert!(pusher.await.unwrap().is_ok());
        assert_eq!(
            q.pop_batch(1, Duration::from_millis(1)).await,
            Some(vec![2])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn blocked_push_times_out_full() {
        let q = BoundedQueue::new(1, 1000);
        q.try_push(1, 1).unwrap();
        let res = q.push_timeout(2, 1, Duration::from_millis(100)).await;
        assert!(matches!(res, Err(PushError::Full(2))));
    }

    #[tokio::test(start_paused = true)]
    async fn close_drains_then_ends() {
        let q = BoundedQueue::new(10, 1000);
        q.try_push(1, 1).unwrap();
        q.try_push(2, 1).unwrap();
        q.close();
        assert!(matches!(q.try_push(3, 1), Err(PushError::Closed(3))));
        assert_eq!(
            q.pop_batch(10, Duration::from_secs(1)).await,
            Some(vec![1, 2])
        );
        assert_eq!(q.pop_batch(10, Duration::from_secs(1)).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn close_wakes_idle_consumer() {
        let q = Arc::new(BoundedQueue::<u32>::new(10, 1000));
        let consumer = {
            let q = q.clone();
            tokio::spawn(async move { q.pop_batch(10, Duration::from_secs(1)).await })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        q.close();
        assert_eq!(consumer.await.unwrap(), None);
    }

    proptest! {
        /// Whatever the interleaving of pushes and pops, every accepted item
        /// comes out exactly once, in order, and the bounds always hold.
        #[test]
        fn nothing_accepted_is_lost(ops in proptest::collection::vec((any::<bool>(), 1usize..8, 1usize..5), 1..200)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
            rt.block_on(async {
                let q = BoundedQueue::new(5, 20);
                let mut accepted = Vec::new();
                let mut popped = Vec::new();
                let mut next = 0u32;
                for (push, bytes, max) in ops {
                    if push {
                        if q.try_push(next, bytes).is_ok() { accepted.push(next); }
                        next += 1;
                    } else if !q.is_empty() {
                        popped.extend(q.pop_batch(max, Duration::from_millis(1)).await.unwrap());
                    }
                    prop_assert!(q.len() <= 5);
                    prop_assert!(q.bytes() <= 20);
                }
                q.close();
                while let Some(batch) = q.pop_batch(3, Duration::from_millis(1)).await {
                    popped.extend(batch);
                }
                prop_assert_eq!(accepted, popped);
                prop_assert_eq!(q.bytes(), 0);
                Ok(())
            })?;
        }
    }
}
