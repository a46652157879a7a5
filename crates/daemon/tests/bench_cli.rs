//! `convstore bench` as a user runs it, against a real daemon (real managed
//! PostgreSQL, the Ollama stand-in as a real process, real sockets): its
//! JSON report must add up, and what it says was stored must be what the
//! database holds. No timing is asserted: only counts and orderings.
// Test code: a panic on what the test set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::Command;

use serde_json::Value;
use sqlx::PgPool;
use support::daemon::{BIN, Daemon, Standin, Workspace, connect_db};

const MODEL: &str = "all-minilm";
const DIMS: usize = 384;
const CONTEXT: usize = 512;

/// Runs `convstore bench` with `args` plus `--json` into `dir`; returns
/// the parsed report and stdout. Panics with the output if it fails.
async fn bench(dir: &Path, name: &str, args: &[&str]) -> (Value, String) {
    let json = dir.join(format!("{name}.json"));
    let markdown = dir.join(format!("{name}.md"));
    let mut cmd = Command::new(BIN);
    cmd.arg("bench")
        .args(args)
        .arg("--json")
        .arg(&json)
        .arg("--markdown")
        .arg(&markdown)
        .arg("--no-progress")
        .env_remove("CONVSTORE_CONFIG");
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("run convstore bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "bench {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // Shown with --nocapture, and on failure.
    eprintln!("{stdout}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("JSON report written"))
            .expect("the JSON report parses");
    let md = std::fs::read_to_string(&markdown).expect("Markdown report written");
    assert!(md.starts_with("### convstore bench"), "{md}");
    (report, stdout)
}

/// 200 generated conversations as JSONL in `dir`; returns the path.
fn small_data(dir: &Path) -> String {
    let path = dir.join("data.jsonl");
    let lines: Vec<String> = convstore_dataset::generate(200, 7)
        .iter()
        .map(Value::to_string)
        .collect();
    std::fs::write(&path, lines.join("\n") + "\n").expect("write data");
    path.display().to_string()
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// A phase's counts add up and its percentiles are ordered; returns
/// (sent, accepted).
fn check_phase(p: &Value) -> (u64, u64) {
    let sent = u(&p["sent"]);
    let by_status: u64 = p["by_status"]
        .as_object()
        .expect("by_status")
        .values()
        .map(u)
        .sum();
    assert_eq!(by_status, sent, "by_status sums to sent: {p}");
    let (accepted, rejected, errors) = (u(&p["accepted"]), u(&p["rejected"]), u(&p["errors"]));
    assert_eq!(accepted + rejected + errors, sent, "{p}");
    assert_eq!(u(&p["by_status"]["202"]), accepted, "accepted = 202s: {p}");
    assert_eq!(errors, 0, "a healthy daemon answers every request: {p}");
    let l = &p["latency"];
    assert_eq!(u(&l["count"]), sent, "one latency per request: {p}");
    let order: Vec<f64> = [
        "min_us", "p50_us", "p90_us", "p95_us", "p99_us", "p999_us", "max_us",
    ]
    .iter()
    .map(|k| f(&l[k]))
    .collect();
    assert!(order[0] > 0.0, "{l}");
    assert!(
        order.windows(2).all(|w| w[0] <= w[1]),
        "percentiles ordered: {l}"
    );
    if !p["service_time"].is_null() {
        // Service time is part of latency (the open loop adds the wait).
        assert!(
            f(&p["service_time"]["p50_us"]) <= f(&l["p50_us"]) * 1.01,
            "{p}"
        );
    }
    (sent, accepted)
}

/// The whole report is consistent: phases, totals, stored counts.
fn check_report(r: &Value) {
    let mut phases: Vec<&Value> = r["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| &s["phase"])
        .collect();
    if phases.is_empty() {
        phases.push(&r["measured"]);
    }
    let (mut sent, mut accepted) = (0, 0);
    for p in phases {
        let (s, a) = check_phase(p);
        sent += s;
        accepted += a;
    }
    assert_eq!(u(&r["totals"]["sent"]), sent, "totals: {r}");
    assert_eq!(u(&r["totals"]["accepted"]), accepted, "totals: {r}");
    let stored = &r["stored"];
    assert_eq!(
        stored["complete"], true,
        "every accepted one committed: {stored}"
    );
    assert_eq!(
        u(&stored["conversations"]) + u(&stored["duplicates"]) + u(&stored["failed"]),
        accepted,
        "{stored}"
    );
    assert_eq!(u(&stored["failed"]), 0, "{stored}");
    // Every text a batch looked up missed or hit; what both caches missed
    // went to the stand-in (more than once only if a call was retried).
    let work = &r["embedding"];
    if u(&stored["conversations"]) > 0 {
        assert!(u(&work["l1_hits"]) + u(&work["l1_misses"]) > 0, "{work}");
    }
    assert_eq!(
        u(&work["l2_hits"]) + u(&work["l2_misses"]),
        u(&work["l1_misses"]),
        "{work}"
    );
    assert!(
        u(&work["backend_inputs"]) >= u(&work["l2_misses"]),
        "{work}"
    );
    if u(&stored["conversations"]) > 0 {
        assert!(f(&stored["conversations_per_s"]) > 0.0, "{stored}");
        assert!(
            u(&stored["chunks"]) >= u(&stored["conversations"]),
            "{stored}"
        );
    }
}

async fn count(pool: &PgPool, sql: &str, arg: &str) -> u64 {
    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .bind(arg)
        .fetch_one(pool)
        .await
        .expect("count query");
    u64::try_from(n).expect("count")
}

async fn rows_of_run(pool: &PgPool, run: &str) -> (u64, u64) {
    let pattern = format!("bench-{run}-%");
    let conversations = count(
        pool,
        "SELECT count(*) FROM conversations WHERE client_id LIKE $1",
        &pattern,
    )
    .await;
    let chunks = count(
        pool,
        "SELECT count(*) FROM conversation_chunks k JOIN conversations c \
         ON c.id = k.conversation_id WHERE c.client_id LIKE $1",
        &pattern,
    )
    .await;
    (conversations, chunks)
}

/// Closed loop over the socket, open loop over HTTP, a ramp, and
/// `--reuse-ids`, against one daemon; every report agrees with the tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_add_up_and_match_the_database() {
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &[]);
    let ws = Workspace::new();
    let addr = ws.write_config(&standin.url(), MODEL, DIMS, "");
    let daemon = Daemon::start(&ws, &addr).await;
    let pool = connect_db(&ws.database_url()).await;
    let socket = ws.socket().display().to_string();
    let url = daemon.base_url();
    let dir = ws.path();
    // The default data (the shared sample) takes seconds to load in a debug
    // build: only the first run uses it; the others read a small file.
    let data = small_data(dir);

    // 1. Closed loop over the Unix socket for ~2 s.
    let (r, stdout) = bench(
        dir,
        "closed",
        &[
            "--socket",
            &socket,
            "--run-id",
            "closed",
            "--duration",
            "2",
            "--concurrency",
            "4",
        ],
    )
    .await;
    check_report(&r);
    assert_eq!(r["target"]["transport"], "unix");
    assert_eq!(r["mode"]["kind"], "closed");
    assert!(u(&r["measured"]["sent"]) > 0);
    assert!(stdout.contains("p99"), "the table is printed: {stdout}");
    let (conversations, chunks) = rows_of_run(&pool, "closed").await;
    assert_eq!(conversations, u(&r["stored"]["conversations"]), "{r}");
    assert_eq!(
        conversations,
        u(&r["totals"]["accepted"]),
        "fresh ids: no duplicates"
    );
    assert_eq!(chunks, u(&r["stored"]["chunks"]), "{r}");

    // 2. Open loop over HTTP: the schedule holds exactly rate × duration;
    //    every text is made unique.
    let (r, _) = bench(
        dir,
        "open",
        &[
            "--url",
            &url,
            "--data",
            &data,
            "--run-id",
            "open",
            "--rate",
            "200",
            "--duration",
            "1.5",
            "--unique-text",
        ],
    )
    .await;
    check_report(&r);
    assert_eq!(r["target"]["transport"], "http");
    assert_eq!(u(&r["measured"]["sent"]) + u(&r["measured"]["unsent"]), 300);
    assert!(!r["measured"]["service_time"].is_null());
    let (conversations, chunks) = rows_of_run(&pool, "open").await;
    assert_eq!(conversations, u(&r["stored"]["conversations"]), "{r}");
    assert_eq!(chunks, u(&r["stored"]["chunks"]), "{r}");
    let marked = count(
        &pool,
        "SELECT count(*) FROM conversations WHERE transcript LIKE $1",
        "%[bench open-%]%",
    )
    .await;
    assert_eq!(marked, conversations, "--unique-text marks every text");

    // 3. A ramp with limits no step can break: every step runs.
    let (r, _) = bench(
        dir,
        "ramp",
        &[
            "--socket",
            &socket,
            "--data",
            &data,
            "--run-id",
            "ramp",
            "--rate",
            "50",
            "--ramp",
            "--ramp-max",
            "150",
            "--duration",
            "0.5",
            "--p99-limit-ms",
            "60000",
            "--reject-limit",
            "1",
        ],
    )
    .await;
    check_report(&r);
    let rates: Vec<f64> = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| f(&s["rate"]))
        .collect();
    assert_eq!(rates, vec![50.0, 100.0, 150.0]);
    assert_eq!(f(&r["ramp"]["sustained_rate"]), 150.0);
    assert!(r["ramp"]["breaking_rate"].is_null());
    let (conversations, _) = rows_of_run(&pool, "ramp").await;
    assert_eq!(conversations, u(&r["stored"]["conversations"]), "{r}");

    // 4. --reuse-ids sends the data's own ids: a second pass is all duplicates.
    let reuse = [
        "--socket",
        &socket,
        "--data",
        &data,
        "--reuse-ids",
        "--count",
        "40",
        "--concurrency",
        "2",
    ];
    let (first, _) = bench(dir, "reuse1", &reuse).await;
    check_report(&first);
    assert_eq!(u(&first["measured"]["sent"]), 40, "--count");
    assert_eq!(u(&first["stored"]["conversations"]), 40);
    let (second, _) = bench(dir, "reuse2", &reuse).await;
    check_report(&second);
    assert_eq!(u(&second["stored"]["conversations"]), 0, "{second}");
    assert_eq!(u(&second["stored"]["duplicates"]), 40, "{second}");

    // 5. The same texts under new ids: all of them were embedded by the
    //    runs above, so every lookup hits the cache and no backend is called.
    let (seen, _) = bench(
        dir,
        "seen",
        &[
            "--socket",
            &socket,
            "--data",
            &data,
            "--run-id",
            "seen",
            "--count",
            "40",
            "--concurrency",
            "2",
        ],
    )
    .await;
    check_report(&seen);
    assert_eq!(u(&seen["stored"]["conversations"]), 40, "{seen}");
    let work = &seen["embedding"];
    assert!(u(&work["l1_hits"]) >= 40, "{work}");
    assert_eq!(f(&work["hit_ratio"]), 1.0, "{work}");
    assert_eq!(u(&work["backend_requests"]), 0, "{work}");
    assert_eq!(u(&work["backend_inputs"]), 0, "{work}");

    // Everything the reports say was stored is in the database, and nothing else.
    let all: i64 = sqlx::query_scalar("SELECT count(*) FROM conversations")
        .fetch_one(&pool)
        .await
        .unwrap();
    let reported: u64 = ["closed", "open", "ramp", "reuse1", "reuse2", "seen"]
        .iter()
        .map(|name| {
            let text = std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap();
            let r: Value = serde_json::from_str(&text).unwrap();
            u(&r["stored"]["conversations"])
        })
        .sum();
    assert_eq!(u64::try_from(all).unwrap(), reported);
    drop(daemon);
}

/// Without a daemon, bench says what it could not reach and fails.
#[test]
fn no_daemon_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_data(dir.path());
    let socket = dir.path().join("absent.sock");
    for extra in [&[][..], &["--no-wait"][..]] {
        let out = Command::new(BIN)
            .args(["bench", "--socket"])
            .arg(&socket)
            .args(["--duration", "1", "--no-progress", "--data", &data])
            .args(extra)
            .env_remove("CONVSTORE_CONFIG")
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?}: {stderr}");
        assert!(
            stderr.contains("absent.sock") && stderr.contains("is convstore running?"),
            "{extra:?}: {stderr}"
        );
    }
}
