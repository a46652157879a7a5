//! The builtin embedder (all-MiniLM-L6-v2 on the CPU): load time, memory,
//! and texts per second for short and long inputs at several batch sizes.
//!
//! `cargo bench --bench builtin_embed` (a few minutes on 2 cores). Without
//! `--bench` (as under `cargo test --benches`) it embeds two texts as a smoke
//! test. Needs the model `scripts/setup.sh` installs.
//!
//! Inputs, from the shared sample when it is there (else the generator):
//! - short: the first user message of each conversation (~15 tokens);
//! - long: conversation chunks cut by the chunker at the model's 256-token
//!   context, keeping those of ≥ 180 tokens.
//!
//! Each run sends the inputs as `embed` calls of `batch` texts from
//! `BENCH_CALLERS` concurrent callers (4, the default `pipeline.workers`),
//! through a backend whose inference pool runs `threads` model batches at
//! once. Knobs (environment): `BENCH_THREADS` (`1,2`), `BENCH_BATCHES`
//! (`1,8,32,64`), `BENCH_CALLERS` (4), `BENCH_SHORT` (512 texts),
//! `BENCH_LONG` (128 texts), `BENCH_MAX_BATCH_TOKENS` (the default 4096).
//!
//! Memory is the process's VmRSS (resident) before loading, after loading,
//! after the warm-up, and VmHWM (its peak) after all runs.
// Test code: a panic on what the test set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use convstore_core::chunker::{Chunker, fit_exactly};
use convstore_core::model::Conversation;
use convstore_embed::Embedder;
use convstore_embed_builtin::files::resolve_model_dir;
use convstore_embed_builtin::{BuiltinBackend, BuiltinOptions};
use serde_json::Value;

const MODEL: &str = "all-minilm";

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty())
        .unwrap_or_else(|| default.to_vec())
}

fn env_usize(name: &str, default: usize) -> usize {
    env_list(name, &[default])[0]
}

/// CPU seconds this process has used (user + system): on a shared machine
/// texts per CPU-second says more about the model than texts per second.
fn cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a rusage into the pointer it is given, which
    // points at a zeroed rusage of the right size.
    let usage = unsafe {
        if libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) != 0 {
            return 0.0;
        }
        usage.assume_init()
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// (VmRSS, VmHWM) in MiB.
fn memory_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kib| kib.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn transcript(c: &Value) -> String {
    c["messages"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    format!(
                        "{}: {}\n",
                        m["role"].as_str().unwrap_or(""),
                        m["content"].as_str().unwrap_or("")
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn inputs(backend: &BuiltinBackend, short_n: usize, long_n: usize) -> (Vec<String>, Vec<String>) {
    let data = convstore_dataset::sample_or_generated(4000).expect("test data");
    let short: Vec<String> = data
        .iter()
        .filter_map(|c| c["messages"][0]["content"].as_str().map(str::to_string))
        .take(short_n)
        .collect();
    let counter = backend.token_counter().expect("token counter");
    let chunker = Chunker::new(backend.max_tokens(), 0);
    let mut long = Vec::new();
    for c in &data {
        let conversation = Conversation {
            transcript: Some(transcript(c)),
            ..blank()
        };
        for chunk in fit_exactly(chunker.chunk(&conversation), counter.as_ref()) {
            if backend.count_tokens(&chunk.content) >= 180 {
                long.push(chunk.content);
            }
        }
        if long.len() >= long_n {
            break;
        }
    }
    long.truncate(long_n);
    (short, long)
}

fn blank() -> Conversation {
    Conversation {
        id: uuid::Uuid::nil(),
        client_id: None,
        user_id: "u".into(),
        channel: "c".into(),
        messages: Vec::new(),
        transcript: None,
        summary: None,
        metadata: serde_json::json!({}),
        created_at: None,
        received_at: chrono::Utc::now(),
        received_instant: Instant::now(),
    }
}

/// Embeds `texts` in calls of `batch` from `callers` concurrent callers;
/// returns (wall seconds, CPU seconds).
async fn run(
    backend: &BuiltinBackend,
    texts: &[String],
    batch: usize,
    callers: usize,
) -> (f64, f64) {
    let calls: Vec<Vec<String>> = texts.chunks(batch).map(<[String]>::to_vec).collect();
    let queue = Arc::new(std::sync::Mutex::new(calls));
    let started = Instant::now();
    let cpu = cpu_seconds();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..callers {
        let (backend, queue) = (backend.clone(), queue.clone());
        tasks.spawn(async move {
            loop {
                let next = queue.lock().ok().and_then(|mut q| q.pop());
                let Some(call) = next else { break };
                backend.embed(&call).await.expect("embed");
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    (started.elapsed().as_secs_f64(), cpu_seconds() - cpu)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let full = args.iter().any(|a| a == "--bench");
    let dir = resolve_model_dir("", MODEL, Path::new("/nonexistent-state-dir"))
        .unwrap_or_else(|e| panic!("{e}"));

    let (rss_before, _) = memory_mib();
    let started = Instant::now();
    let options = BuiltinOptions {
        max_batch_tokens: env_usize(
            "BENCH_MAX_BATCH_TOKENS",
            BuiltinOptions::default().max_batch_tokens,
        ),
        ..BuiltinOptions::default()
    };
    let backend = BuiltinBackend::load_with("bench", &dir, MODEL, options).expect("load");
    let load_s = started.elapsed().as_secs_f64();
    let (rss_loaded, _) = memory_mib();
    let started = Instant::now();
    backend.probe().await.expect("warm-up");
    let warm_s = started.elapsed().as_secs_f64();
    let (rss_warm, _) = memory_mib();
    if !full {
        let v = backend
            .embed(&["hello".to_string(), "book a flight".to_string()])
            .await
            .expect("embed");
        assert_eq!(v.len(), 2);
        return;
    }
    println!(
        "model {}: load {:.2} s, warm-up {:.3} s; RSS {:.0} MiB before, {:.0} MiB loaded (+{:.0}), {:.0} MiB warm",
        dir.display(),
        load_s,
        warm_s,
        rss_before,
        rss_loaded,
        rss_loaded - rss_before,
        rss_warm
    );

    let callers = env_usize("BENCH_CALLERS", 4);
    let (short, long) = inputs(
        &backend,
        env_usize("BENCH_SHORT", 512),
        env_usize("BENCH_LONG", 128),
    );
    let tokens =
        |texts: &[String]| -> usize { texts.iter().map(|t| backend.count_tokens(t)).sum() };
    let (short_tokens, long_tokens) = (tokens(&short), tokens(&long));
    println!(
        "short: {} texts, {:.1} tokens each; long: {} texts, {:.1} tokens each; {callers} callers; \
         max_batch_tokens {}; {} cores",
        short.len(),
        short_tokens as f64 / short.len().max(1) as f64,
        long.len(),
        long_tokens as f64 / long.len().max(1) as f64,
        options.max_batch_tokens,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    println!("| pool threads | batch | input | texts/s | tokens/s | texts per CPU-s | load avg |");
    println!("|---|---|---|---|---|---|---|");
    for threads in env_list("BENCH_THREADS", &[1, 2]) {
        let backend =
            BuiltinBackend::load_with("bench", &dir, MODEL, BuiltinOptions { threads, ..options })
                .expect("load");
        backend.probe().await.expect("warm-up");
        for batch in env_list("BENCH_BATCHES", &[1, 8, 32, 64]) {
            for (name, texts, n_tokens) in [
                ("short", &short, short_tokens),
                ("long", &long, long_tokens),
            ] {
                let (secs, cpu) = run(&backend, texts, batch, callers).await;
                let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
                println!(
                    "| {threads} | {batch} | {name} | {:.1} | {:.0} | {:.1} | {} |",
                    texts.len() as f64 / secs,
                    n_tokens as f64 / secs,
                    texts.len() as f64 / cpu.max(1e-9),
                    load.split_whitespace().next().unwrap_or("?")
                );
            }
        }
    }
    let (rss_end, peak) = memory_mib();
    println!("RSS after the runs {rss_end:.0} MiB, peak (VmHWM) {peak:.0} MiB");
}
