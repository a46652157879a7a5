//! L1 embedding cache: an in-memory LRU keyed by (model, content hash).
//!
//! Identical chunk texts (greetings, boilerplate, re-sent conversations) are
//! embedded once. Vectors are shared as `Arc<[f32]>`, so a hit copies no
//! floats. One mutex: lookups are a hash probe and a list splice, far
//! shorter than anything else a worker does per chunk.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;

use convstore_core::model::ContentHash;

/// One cache entry's key. The model is part of it: vectors of two models
/// are never interchangeable, even at the same dimension.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub model: Arc<str>,
    pub hash: ContentHash,
}

pub struct EmbeddingCache {
    entries: Mutex<LruCache<CacheKey, Arc<[f32]>>>,
}

impl EmbeddingCache {
    pub fn new(max_entries: NonZeroUsize) -> Self {
        Self {
            entries: Mutex::new(LruCache::new(max_entries)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<CacheKey, Arc<[f32]>>> {
        // The LRU is consistent after every call; a panic elsewhere while
        // holding the lock cannot corrupt it.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached vector, marking it most recently used.
    pub fn get(&self, key: &CacheKey) -> Option<Arc<[f32]>> {
        self.lock().get(key).cloned()
    }

    /// Looks up many keys under one lock; `None` where missing.
    pub fn get_many<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a CacheKey>,
    ) -> Vec<Option<Arc<[f32]>>> {
        let mut entries = self.lock();
        keys.into_iter().map(|k| entries.get(k).cloned()).collect()
    }

    pub fn insert(&self, key: CacheKey, vector: Arc<[f32]>) {
        self.lock().put(key, vector);
    }

    /// Inserts many entries under one lock.
    pub fn insert_many(&self, items: impl IntoIterator<Item = (CacheKey, Arc<[f32]>)>) {
        let mut entries = self.lock();
        for (k, v) in items {
            entries.put(k, v);
        }
    }

    /// Evicts the entries of these texts, whatever their model (an
    /// erasure: the text is what is personal); returns how many went.
    /// Walks the whole cache: for the rare erasure, not the hot path.
    pub fn remove_hashes(&self, hashes: &[ContentHash]) -> usize {
        let wanted: std::collections::HashSet<&ContentHash> = hashes.iter().collect();
        let mut entries = self.lock();
        let doomed: Vec<CacheKey> = entries
            .iter()
            .filter(|(k, _)| wanted.contains(&k.hash))
            .map(|(k, _)| k.clone())
            .collect();
        for key in &doomed {
            entries.pop(key);
        }
        doomed.len()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        self.lock().cap().get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use convstore_core::model::content_hash;

    fn key(model: &str, text: &str) -> CacheKey {
        CacheKey {
            model: Arc::from(model),
            hash: content_hash(text),
        }
    }

    #[test]
    fn hit_after_insert_and_model_separates() {
        let cache = EmbeddingCache::new(NonZeroUsize::new(4).unwrap());
        cache.insert(key("a", "hello"), Arc::from(vec![1.0f32, 0.0]));
        assert_eq!(
            cache.get(&key("a", "hello")).as_deref(),
            Some(&[1.0f32, 0.0][..])
        );
        assert!(cache.get(&key("b", "hello")).is_none());
        assert!(cache.get(&key("a", "other")).is_none());
    }

    #[test]
    fn evicts_least_recently_used() {
        let cache = EmbeddingCache::new(NonZeroUsize::new(2).unwrap());
        cache.insert(key("m", "1"), Arc::from(vec![1.0f32]));
        cache.insert(key("m", "2"), Arc::from(vec![2.0f32]));
        assert!(cache.get(&key("m", "1")).is_some());
        cache.insert(key("m", "3"), Arc::from(vec![3.0f32]));
        assert!(
            cache.get(&key("m", "2")).is_none(),
            "2 was least recently used"
        );
        assert!(cache.get(&key("m", "1")).is_some());
        assert_eq!(cache.len(), 2);
    }
}
