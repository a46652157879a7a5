//! The builtin embedder (all-MiniLM-L6-v2 on the CPU), engine by engine:
//! load time, memory, and tokens per second for short and long inputs at
//! several call sizes, on the same inputs.
//!
//! `cargo bench --bench builtin_embed` (a few minutes on 2 cores). Without
//! `--bench` (as under `cargo test --benches`) it embeds two texts on each
//! engine as a smoke test. Needs the model and the OpenVINO runtime
//! `scripts/setup.sh` installs.
//!
//! Inputs, from the shared sample when it is there (else the generator):
//! - short: the first user message of each conversation (~15 tokens);
//! - long: conversation chunks cut by the chunker at the model's 256-token
//!   context, keeping those of ≥ 180 tokens.
//!
//! Each run sends the inputs as `embed` calls of `batch` texts from
//! `BENCH_CALLERS` concurrent callers (4, the default `pipeline.workers`),
//! through a backend whose scheduler runs `threads` model batches at once,
//! each of `per` threads (OpenVINO only). Knobs (environment):
//! `BENCH_ENGINES` (`candle/f32,openvino/f32,openvino/bf16`; bf16 only
//! where the CPU has it), `BENCH_THREADS` (`2x1,1x2`: inferences × threads
//! each), `BENCH_BATCHES` (`1,8,32`), `BENCH_CALLERS` (4), `BENCH_SHORT`
//! (512 texts), `BENCH_LONG` (128 texts), `BENCH_MAX_BATCH_TOKENS` (the
//! default 4096).
//!
//! Memory is the process's VmRSS (resident) before and after loading each
//! engine, and VmHWM (its peak) after all runs.
// Test code: a panic on what the test set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use convstore_core::chunker::{Chunker, fit_exactly};
use convstore_core::model::Conversation;
use convstore_embed::Embedder;
use convstore_embed::settings::{BuiltinEngine, BuiltinPrecision};
use convstore_embed_builtin::engine::{EngineOptions, cpu_has_bf16};
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

/// `engine/precision` names, e.g. `openvino/bf16`.
fn engines() -> Vec<(BuiltinEngine, BuiltinPrecision)> {
    let default = if cpu_has_bf16() {
        "candle/f32,openvino/f32,openvino/bf16"
    } else {
        "candle/f32,openvino/f32"
    };
    std::env::var("BENCH_ENGINES")
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(|name| {
            let (engine, precision) = name.trim().split_once('/').unwrap_or((name, "auto"));
            (
                serde_json::from_value(Value::String(engine.to_string()))
                    .unwrap_or_else(|e| panic!("BENCH_ENGINES: {engine}: {e}")),
                serde_json::from_value(Value::String(precision.to_string()))
                    .unwrap_or_else(|e| panic!("BENCH_ENGINES: {precision}: {e}")),
            )
        })
        .collect()
}

/// `inferences x threads each` pairs, e.g. `2x1`.
fn thread_layouts() -> Vec<(usize, usize)> {
    std::env::var("BENCH_THREADS")
        .unwrap_or_else(|_| "2x1,1x2".to_string())
        .split(',')
        .filter_map(|l| {
            let (n, per) = l.trim().split_once('x').unwrap_or((l, "1"));
            Some((n.parse().ok()?, per.parse().ok()?))
        })
        .collect()
}

fn load(
    dir: &Path,
    engine: BuiltinEngine,
    precision: BuiltinPrecision,
    (threads, per): (usize, usize),
    max_batch_tokens: usize,
) -> BuiltinBackend {
    let options = BuiltinOptions {
        engine: EngineOptions {
            engine,
            precision,
            threads_per_inference: per,
            ..EngineOptions::default()
        },
        threads,
        max_batch_tokens,
        ..BuiltinOptions::default()
    };
    BuiltinBackend::load_with("bench", dir, MODEL, Path::new("/nonexistent"), options)
        .unwrap_or_else(|e| panic!("load {engine:?}/{precision:?}: {e}"))
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
    let max_batch_tokens = env_usize(
        "BENCH_MAX_BATCH_TOKENS",
        BuiltinOptions::default().max_batch_tokens,
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if !full {
        for (engine, precision) in engines() {
            let backend = load(&dir, engine, precision, (cores, 1), max_batch_tokens);
            let v = backend
                .embed(&["hello".to_string(), "book a flight".to_string()])
                .await
                .expect("embed");
            assert_eq!(v.len(), 2);
        }
        return;
    }

    let callers = env_usize("BENCH_CALLERS", 4);
    let reference = load(
        &dir,
        BuiltinEngine::Candle,
        BuiltinPrecision::F32,
        (1, 1),
        max_batch_tokens,
    );
    let (short, long) = inputs(
        &reference,
        env_usize("BENCH_SHORT", 512),
        env_usize("BENCH_LONG", 128),
    );
    let tokens =
        |texts: &[String]| -> usize { texts.iter().map(|t| reference.count_tokens(t)).sum() };
    let (short_tokens, long_tokens) = (tokens(&short), tokens(&long));
    drop(reference);
    println!(
        "short: {} texts, {:.1} tokens each; long: {} texts, {:.1} tokens each; {callers} callers; \
         max_batch_tokens {max_batch_tokens}; {cores} cores",
        short.len(),
        short_tokens as f64 / short.len().max(1) as f64,
        long.len(),
        long_tokens as f64 / long.len().max(1) as f64,
    );
    println!(
        "| engine | precision | inferences × threads | call size | input | texts/s | tokens/s | tokens per CPU-s | load avg |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut best: Vec<(String, &str, f64)> = Vec::new();
    for (engine, precision) in engines() {
        for layout in thread_layouts() {
            if engine == BuiltinEngine::Candle && layout.1 != 1 {
                continue;
            }
            let (rss_before, _) = memory_mib();
            let started = Instant::now();
            let backend = load(&dir, engine, precision, layout, max_batch_tokens);
            let load_s = started.elapsed().as_secs_f64();
            backend.probe().await.expect("warm-up");
            let (rss_loaded, _) = memory_mib();
            let on = format!("{}/{}", backend.engine(), backend.precision());
            eprintln!(
                "{on} {}x{}: load {load_s:.2} s; RSS {rss_before:.0} → {rss_loaded:.0} MiB",
                layout.0, layout.1
            );
            for batch in env_list("BENCH_BATCHES", &[1, 8, 32]) {
                for (name, texts, n_tokens) in [
                    ("short", &short, short_tokens),
                    ("long", &long, long_tokens),
                ] {
                    let (secs, cpu) = run(&backend, texts, batch, callers).await;
                    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
                    let rate = n_tokens as f64 / secs;
                    println!(
                        "| {} | {} | {}×{} | {batch} | {name} | {:.1} | {rate:.0} | {:.0} | {} |",
                        backend.engine(),
                        backend.precision(),
                        layout.0,
                        layout.1,
                        texts.len() as f64 / secs,
                        n_tokens as f64 / cpu.max(1e-9),
                        load.split_whitespace().next().unwrap_or("?")
                    );
                    match best.iter_mut().find(|(e, n, _)| *e == on && *n == name) {
                        Some(entry) => entry.2 = entry.2.max(rate),
                        None => best.push((on.clone(), name, rate)),
                    }
                }
            }
        }
    }
    println!("\nbest tokens/s per engine and input, and the ratio to candle:");
    for (on, name, rate) in &best {
        let candle = best
            .iter()
            .find(|(e, n, _)| e == "candle/f32" && n == name)
            .map_or(f64::NAN, |b| b.2);
        println!(
            "{on} {name}: {rate:.0} tokens/s ({:.1}× candle)",
            rate / candle
        );
    }
    let (rss_end, peak) = memory_mib();
    println!("RSS after the runs {rss_end:.0} MiB, peak (VmHWM) {peak:.0} MiB");
}
