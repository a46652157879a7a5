//! What parsing holds in memory, counted by the allocator itself: a batch
//! far over its item limit is refused without being built, and the queue's
//! byte bound (`Conversation::approx_bytes`) does not under-count what a
//! conversation really holds (issue 15: 256 MiB of queue took 648 MB).
// Test code: a panic on what the test set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use convstore_core::batch_body::split_items;
use convstore_core::error::InputError;
use convstore_core::validate::{Limits, parse_conversation};

/// The system allocator, counting the bytes live now and the peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to `System` unchanged; only counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            let live = LIVE.fetch_add(new_size, Ordering::Relaxed) + new_size;
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The counters are process-wide: one measurement at a time.
static MEASURING: Mutex<()> = Mutex::new(());

/// Runs `f`; returns its result and the most bytes it had live at once
/// beyond what was live before.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed) - before)
}

const LIMITS: Limits = Limits {
    max_messages: 1_000,
    max_content_bytes: 65_536,
    max_metadata_bytes: 16_384,
    max_metadata_depth: 8,
    max_id_bytes: 128,
    max_label_bytes: 128,
};

#[test]
fn a_20_mb_array_over_the_item_limit_is_refused_without_building_it() {
    let _one = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    // 20 MB of `{},` is 6.7 million items; the limit is 1,000.
    let mut body = Vec::with_capacity(20 << 20);
    body.push(b'[');
    while body.len() < (20 << 20) - 3 {
        body.extend_from_slice(b"{},");
    }
    body.extend_from_slice(b"{}]");
    let (refused, peak) = peak_of(|| split_items(&body, false, 1_000));
    println!(
        "20 MiB array of {{}}: refused with a peak of {} KiB live",
        peak >> 10
    );
    assert!(matches!(refused, Err(InputError::PayloadTooLarge(_))));
    assert!(
        peak < 1 << 20,
        "refusing took {peak} bytes at once: the array was built before it was counted"
    );
}

/// A realistic conversation: `turns` messages of a few sentences, metadata.
fn conversation_json(turns: usize, seed: usize) -> String {
    let messages: Vec<String> = (0..turns)
        .map(|i| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            let content = format!(
                "Message {i} of conversation {seed}: I ordered the blue kettle (order {}) last \
                 week and it still has not shipped. Could you tell me where it is and when it \
                 will arrive? {}",
                1000 + seed * 7 + i,
                "Thanks for your patience. ".repeat(i % 5)
            );
            serde_json::json!({"role": role, "content": content, "ts": "2024-05-01T10:00:00Z"})
                .to_string()
        })
        .collect();
    format!(
        r#"{{"id":"conv-{seed}","user_id":"user-{}","channel":"web","messages":[{}],"metadata":{{"plan":"pro","tags":["billing","shipping"],"score":{seed}}}}}"#,
        seed % 97,
        messages.join(",")
    )
}

#[test]
fn the_queue_bound_does_not_under_count_what_a_conversation_holds() {
    let _one = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let bodies: Vec<String> = [1usize, 2, 5, 12, 40, 200]
        .iter()
        .enumerate()
        .map(|(seed, turns)| conversation_json(*turns, seed))
        .collect();
    for body in &bodies {
        let before = LIVE.load(Ordering::Relaxed);
        let conversation = parse_conversation(body.as_bytes(), LIMITS).expect("valid");
        let held = LIVE.load(Ordering::Relaxed) - before + std::mem::size_of_val(&conversation);
        let counted = conversation.approx_bytes();
        println!(
            "{} messages, {} body bytes: holds {held} B, counted {counted} B ({:.2}x)",
            conversation.messages.len(),
            body.len(),
            counted as f64 / held as f64
        );
        assert!(
            counted >= held,
            "{} messages: counted {counted} B but holds {held} B",
            conversation.messages.len()
        );
        assert!(
            counted <= held * 2,
            "{} messages: counted {counted} B for {held} B held",
            conversation.messages.len()
        );
        drop(conversation);
    }
}
