//! Durability under faults, with real processes: the daemon (journal on),
//! its managed PostgreSQL, the embedding stand-in.
//!
//! - `kill9_at_random_points_loses_nothing_acknowledged`: SIGKILL of the
//!   daemon at 20 random points under load (some during start-up and
//!   journal replay), restart: every conversation acknowledged — at any
//!   level — is in PostgreSQL exactly once.
//! - `database_frozen_30s_then_back`: every PostgreSQL process stopped
//!   (SIGSTOP) for 30 s under load: readiness reports it, 429 comes only
//!   once the queue is full, everything accepted is stored after SIGCONT
//!   with no operator; then the postmaster is killed and the daemon
//!   restarts the managed cluster on its own.
//! - `admission_follows_the_store_rate_across_a_restart_and_refusals_are_not_losses`: a
//!   slow pipeline under a 200/s load: the queue admits about
//!   `queue.max_backlog_seconds` of the measured store rate, far below its
//!   capacity, answers 429 past it, and stores everything it accepted;
//!   restarted, it admits by the saved estimate from the first request.
//! - `embedders_down_60s_stores_pending_then_backfills`: the only embedding
//!   backend down for 60 s under load: nothing lost, stored as pending, all
//!   embedded by the backfill once it is back.
//! - `ack_levels_in_flight_view_and_a_full_journal`: `?wait=` levels,
//!   504 with the id, `GET` while in flight, 429 when the journal is full.
//! - `journal_disk_full_on_a_small_filesystem`: the journal directory on a
//!   2 MiB tmpfs fills while storage is stalled: 503 with `Retry-After` and
//!   readiness naming the journal; recovery without a restart once stored;
//!   then a kill -9 on the full disk and a restart that replays first.
//! - `refusals_with_the_journal_on_are_not_losses`: 429 `journal_full`
//!   (single, `?wait=stored`, batch) is counted as a refusal, never as
//!   `convstore_conversations_failed_total{reason="lost"}`.
//!
//! The seed of the random kill points is printed; `CONVSTORE_TEST_SEED`
//! replays a run.
// Test code: a panic on what the test set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::PgPool;
use support::daemon::{Daemon, Standin, Workspace, connect_db};
use support::exposition::Scrape;

const MODEL: &str = "durability-embed";
const DIMS: usize = 32;
const CONTEXT: usize = 512;

/// A deterministic generator (splitmix64): the kill points must be
/// reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

fn seed() -> u64 {
    std::env::var("CONVSTORE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(42)
        })
}

/// Conversation bodies to send (real sample when present), cycled.
fn bodies() -> Vec<Value> {
    convstore_dataset::sample_or_generated(300).expect("test data")
}

/// `body` with a new client id (or none) and user id.
fn with_ids(body: &Value, id: Option<&str>, user: &str) -> Value {
    let mut v = body.clone();
    let obj = v.as_object_mut().expect("object");
    match id {
        Some(id) => {
            obj.insert("id".into(), json!(id));
        }
        None => {
            obj.remove("id");
        }
    }
    obj.insert("user_id".into(), json!(user));
    v
}

/// An acknowledgement the daemon gave.
#[derive(Debug, Clone)]
struct Ack {
    /// The cycle (kill point) it was given in.
    cycle: usize,
    /// `queued`, `durable` or `stored`, as answered.
    level: String,
    /// The client id, or for anonymous conversations the assigned UUID.
    id: String,
    anonymous: bool,
    user_id: String,
}

/// One load task: posts conversations until `stop`, recording every 2xx.
async fn load(
    base: String,
    cycle: usize,
    task: usize,
    stop: Arc<AtomicBool>,
    acks: Arc<Mutex<Vec<Ack>>>,
    data: Arc<Vec<Value>>,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let body = &data[(task * 7919 + n) % data.len()];
        let kind = n % 10;
        if kind == 9 {
            // A batch, waiting for durability.
            let ids: Vec<String> = (0..4)
                .map(|i| format!("c{cycle}-t{task}-n{n}-b{i}"))
                .collect();
            let items: Vec<Value> = ids
                .iter()
                .map(|id| with_ids(body, Some(id), &format!("u-{id}")))
                .collect();
            let Ok(resp) = client
                .post(format!("{base}/v1/conversations/batch?wait=durable"))
                .json(&items)
                .send()
                .await
            else {
                continue;
            };
            if resp.status().is_success()
                && let Ok(v) = resp.json::<Value>().await
            {
                let mut acks = acks.lock().unwrap();
                for r in v["results"].as_array().into_iter().flatten() {
                    if let (Some(id), Some(status)) = (r["id"].as_str(), r["status"].as_str())
                        && status != "rejected"
                        && status != "unfinished"
                    {
                        acks.push(Ack {
                            cycle,
                            level: status.to_string(),
                            id: id.to_string(),
                            anonymous: false,
                            user_id: format!("u-{id}"),
                        });
                    }
                }
            }
            continue;
        }
        let level = match kind {
            0..=3 => "queued",
            4..=6 => "durable",
            _ => "stored",
        };
        let anonymous = n.is_multiple_of(7);
        let client_id = format!("c{cycle}-t{task}-n{n}");
        let user_id = format!("u-{client_id}");
        let item = with_ids(body, (!anonymous).then_some(client_id.as_str()), &user_id);
        let Ok(resp) = client
            .post(format!("{base}/v1/conversations?wait={level}"))
            .json(&item)
            .send()
            .await
        else {
            continue;
        };
        if !resp.status().is_success() {
            if resp.status() == 429 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            continue;
        }
        let Ok(v) = resp.json::<Value>().await else {
            continue;
        };
        let (Some(id), Some(status)) = (v["id"].as_str(), v["status"].as_str()) else {
            continue;
        };
        acks.lock().unwrap().push(Ack {
            cycle,
            level: status.to_string(),
            id: id.to_string(),
            anonymous,
            user_id,
        });
    }
}

fn journal_config(extra: &str) -> String {
    format!(
        r#"[journal]
enabled = true
fsync_interval_ms = 2

[queue]
capacity = 4000

[batch]
max_size = 32
max_wait_ms = 10

[pipeline]
workers = 2

[shutdown]
timeout_ms = 20000

{extra}"#
    )
}

/// Rows per acknowledged id: client ids, and (anonymous ones) the UUIDs
/// the daemon returned, looked up by the unique user id sent with them.
async fn rows_per_ack(db: &PgPool, acks: &[Ack]) -> HashMap<String, i64> {
    let client_ids: Vec<String> = acks
        .iter()
        .filter(|a| !a.anonymous)
        .map(|a| a.id.clone())
        .collect();
    let mut out: HashMap<String, i64> = HashMap::new();
    for chunk in client_ids.chunks(5000) {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT client_id, count(*) FROM conversations WHERE client_id = ANY($1) GROUP BY client_id",
        )
        .bind(chunk)
        .fetch_all(db)
        .await
        .expect("count by client id");
        out.extend(rows);
    }
    let users: Vec<String> = acks
        .iter()
        .filter(|a| a.anonymous)
        .map(|a| a.user_id.clone())
        .collect();
    let by_user: HashMap<String, String> = acks
        .iter()
        .filter(|a| a.anonymous)
        .map(|a| (a.user_id.clone(), a.id.clone()))
        .collect();
    for chunk in users.chunks(5000) {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT user_id, id::text FROM conversations WHERE user_id = ANY($1)")
                .bind(chunk)
                .fetch_all(db)
                .await
                .expect("rows by user id");
        for (user, id) in rows {
            // A row under another id than the one acknowledged would be a
            // duplicate made by a replay that re-assigned ids.
            let key = by_user.get(&user).cloned().unwrap_or_default();
            let entry = out.entry(key.clone()).or_insert(0);
            *entry += if id == key { 1 } else { 1000 };
        }
    }
    out
}

/// Waits until every acknowledged id has a row, or `limit` passes.
async fn wait_all_stored(db: &PgPool, acks: &[Ack], limit: Duration) -> HashMap<String, i64> {
    let started = Instant::now();
    loop {
        let rows = rows_per_ack(db, acks).await;
        let missing = acks.iter().filter(|a| !rows.contains_key(&a.id)).count();
        if missing == 0 || started.elapsed() > limit {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn segments_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".seg"))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_at_random_points_loses_nothing_acknowledged() {
    let seed = seed();
    println!("kill -9 test seed: {seed} (CONVSTORE_TEST_SEED={seed} replays it)");
    let mut rng = Rng(seed);
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &["--latency-ms", "2"]);
    let ws = Workspace::new();
    let addr = ws.write_config(&standin.url(), MODEL, DIMS, &journal_config(""));
    let data = Arc::new(bodies());
    let acks: Arc<Mutex<Vec<Ack>>> = Arc::new(Mutex::new(Vec::new()));
    let mut kill_points: Vec<String> = Vec::new();
    const KILLS: usize = 20;
    const TASKS: usize = 6;
    for cycle in 0..KILLS {
        let mut daemon = Daemon::spawn(&ws, &addr, &[]);
        if cycle % 5 == 4 {
            // During start-up: cluster take-over, migrations, replay.
            let after = rng.range(200, 3000);
            tokio::time::sleep(Duration::from_millis(after)).await;
            daemon.kill9();
            kill_points.push(format!("{after} ms after spawn (start-up/replay)"));
            continue;
        }
        daemon.wait_ready(Duration::from_secs(120)).await;
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                tokio::spawn(load(
                    daemon.base_url(),
                    cycle,
                    t,
                    stop.clone(),
                    acks.clone(),
                    data.clone(),
                ))
            })
            .collect();
        let after = rng.range(150, 2500);
        tokio::time::sleep(Duration::from_millis(after)).await;
        daemon.kill9();
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        kill_points.push(format!("{after} ms into load"));
    }

    // Restart for good: the journal is replayed; everything acknowledged
    // must arrive, once.
    let mut daemon = Daemon::start(&ws, &addr).await;
    let acks = acks.lock().unwrap().clone();
    let db = connect_db(&ws.database_url()).await;
    let rows = wait_all_stored(&db, &acks, Duration::from_secs(240)).await;

    println!("\n| kill point | when | acknowledged (queued/durable/stored) | found | duplicated |");
    println!("|---|---|---|---|---|");
    let mut by_cycle: BTreeMap<usize, Vec<&Ack>> = BTreeMap::new();
    for a in &acks {
        by_cycle.entry(a.cycle).or_default().push(a);
    }
    let (mut total, mut found_total, mut dup_total) = (0, 0, 0);
    let mut lost = Vec::new();
    for (cycle, when) in kill_points.iter().enumerate() {
        let list = by_cycle.get(&cycle).cloned().unwrap_or_default();
        let count = |level: &str| list.iter().filter(|a| a.level == level).count();
        let found = list.iter().filter(|a| rows.contains_key(&a.id)).count();
        let dup: i64 = list
            .iter()
            .filter_map(|a| rows.get(&a.id))
            .map(|n| n - 1)
            .sum();
        for a in &list {
            if !rows.contains_key(&a.id) {
                lost.push((*a).clone());
            }
        }
        println!(
            "| {} | {when} | {} ({}/{}/{}) | {found} | {dup} |",
            cycle + 1,
            list.len(),
            count("queued"),
            count("durable"),
            count("stored")
        );
        total += list.len();
        found_total += found;
        dup_total += dup;
    }
    println!("| all | | {total} | {found_total} | {dup_total} |\n");
    assert!(
        total > 500,
        "too little load to mean anything: {total} acknowledgements"
    );
    assert!(
        lost.is_empty(),
        "{} acknowledged conversations are not in PostgreSQL, e.g. {:?}; log:\n{}",
        lost.len(),
        &lost[..lost.len().min(5)],
        daemon.log_text()
    );
    assert_eq!(dup_total, 0, "duplicated rows");
    // Every stored conversation has its chunks: a replay never leaves a
    // conversation row without them (one transaction per batch).
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM conversations c WHERE NOT EXISTS \
         (SELECT 1 FROM conversation_chunks k WHERE k.conversation_id = c.id)",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(orphans, 0, "conversations stored without chunks");
    // The replayed ones read back as stored.
    let http = reqwest::Client::new();
    for a in acks.iter().step_by((acks.len() / 20).max(1)) {
        let v: Value = http
            .get(format!("{}/v1/conversations/{}", daemon.base_url(), a.id))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["status"], "stored", "{}: {v}", a.id);
    }
    db.close().await;
    let status = daemon.terminate(Duration::from_secs(60));
    assert!(status.success(), "log:\n{}", daemon.log_text());
    let left = segments_in(&ws.path().join("state/journal"));
    assert!(
        left.is_empty(),
        "everything was stored, yet journal segments remain: {left:?}"
    );
}

/// Postmaster pid of the workspace's managed cluster.
fn postmaster_pid(ws: &Workspace) -> i32 {
    ws.running_postmaster()
        .expect("postmaster.pid names a running postmaster")
}

/// The postmaster and every process it started.
fn cluster_processes(postmaster: i32) -> Vec<i32> {
    let mut out = vec![postmaster];
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(postmaster) {
            out.push(pid);
        }
    }
    out
}

fn signal_all(pids: &[i32], sig: i32) {
    for pid in pids {
        // SAFETY: kill(2) on processes of our own test cluster.
        unsafe {
            libc::kill(*pid, sig);
        }
    }
}

async fn readyz(base: &str) -> (u16, Value) {
    let resp = reqwest::Client::new()
        .get(format!("{base}/readyz"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("readyz");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Sends conversations at a steady pace until `stop`, counting outcomes;
/// records the in-pipeline estimate at the first 429.
#[derive(Default)]
struct Pace {
    accepted: AtomicU64,
    refused_429: AtomicU64,
    first_429_accepted: AtomicU64,
}

async fn paced_load(
    base: String,
    tag: &'static str,
    per_sec: u64,
    stop: Arc<AtomicBool>,
    pace: Arc<Pace>,
    acks: Arc<Mutex<Vec<Ack>>>,
    data: Arc<Vec<Value>>,
) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_sec));
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        n += 1;
        let id = format!("{tag}-{n}");
        let body = with_ids(&data[n % data.len()], Some(&id), &format!("u-{id}"));
        let Ok(resp) = client
            .post(format!("{base}/v1/conversations"))
            .json(&body)
            .send()
            .await
        else {
            continue;
        };
        match resp.status().as_u16() {
            202 => {
                pace.accepted.fetch_add(1, Ordering::SeqCst);
                acks.lock().unwrap().push(Ack {
                    cycle: 0,
                    level: "queued".into(),
                    id,
                    anonymous: false,
                    user_id: String::new(),
                });
            }
            429 => {
                if pace.refused_429.fetch_add(1, Ordering::SeqCst) == 0 {
                    pace.first_429_accepted
                        .store(pace.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
                }
            }
            other => panic!("unexpected status {other}: {:?}", resp.text().await),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_frozen_30s_then_back() {
    const CAPACITY: u64 = 400;
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &["--latency-ms", "1"]);
    let ws = Workspace::new();
    let addr = ws.write_config(
        &standin.url(),
        MODEL,
        DIMS,
        &format!(
            "[journal]\nenabled = true\n\n[queue]\ncapacity = {CAPACITY}\n\n[batch]\nmax_size = 16\nmax_wait_ms = 10\n\n[pipeline]\nworkers = 2\n"
        ),
    );
    let mut daemon = Daemon::start(&ws, &addr).await;
    let data = Arc::new(bodies());
    let acks: Arc<Mutex<Vec<Ack>>> = Arc::new(Mutex::new(Vec::new()));
    let db = connect_db(&ws.database_url()).await;

    // Load before, during and after the outage.
    let stop = Arc::new(AtomicBool::new(false));
    let pace = Arc::new(Pace::default());
    let load = tokio::spawn(paced_load(
        daemon.base_url(),
        "frozen",
        60,
        stop.clone(),
        pace.clone(),
        acks.clone(),
        data.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stored_before: i64 = sqlx::query_scalar("SELECT count(*) FROM conversations")
        .fetch_one(&db)
        .await
        .unwrap();
    let accepted_before = pace.accepted.load(Ordering::SeqCst);
    db.close().await;

    let pids = cluster_processes(postmaster_pid(&ws));
    println!("freezing {} PostgreSQL processes for 30 s", pids.len());
    signal_all(&pids, libc::SIGSTOP);
    let frozen_at = Instant::now();
    let mut saw_unready = None;
    while frozen_at.elapsed() < Duration::from_secs(30) {
        let (status, body) = readyz(&daemon.base_url()).await;
        if status == 503 && saw_unready.is_none() {
            saw_unready = Some((frozen_at.elapsed(), body));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let refused = pace.refused_429.load(Ordering::SeqCst);
    let first_429_at = pace.first_429_accepted.load(Ordering::SeqCst);
    signal_all(&pids, libc::SIGCONT);
    println!(
        "frozen 30 s: accepted {} before, {} in total; {refused} answered 429; unready: {saw_unready:?}",
        accepted_before,
        pace.accepted.load(Ordering::SeqCst)
    );
    let (_, body) = saw_unready.expect("readiness never reported the frozen database");
    assert!(
        body["reasons"].to_string().contains("database"),
        "readiness reasons: {body}"
    );
    assert!(refused > 0, "60/s for 30 s must fill a queue of {CAPACITY}");
    // 429 only once the queue was full: by the first 429, at least a
    // queue's worth had been accepted beyond what was stored before the
    // freeze.
    assert!(
        first_429_at as i64 - stored_before >= CAPACITY as i64,
        "first 429 after {first_429_at} accepted, {stored_before} stored before the freeze: the queue ({CAPACITY}) was not full"
    );

    // Recovery without an operator.
    let started = Instant::now();
    loop {
        if readyz(&daemon.base_url()).await.0 == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not ready again within 60 s of SIGCONT; log:\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("ready again {:?} after SIGCONT", started.elapsed());

    // Then the postmaster is killed outright: the daemon restarts it.
    let old = postmaster_pid(&ws);
    signal_all(&[old], libc::SIGKILL);
    let killed_at = Instant::now();
    let mut restarted = false;
    while killed_at.elapsed() < Duration::from_secs(90) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let pid = std::fs::read_to_string(ws.path().join("state/postgres/data/postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
        if pid.is_some_and(|p| p != old) && readyz(&daemon.base_url()).await.0 == 200 {
            restarted = true;
            break;
        }
    }
    assert!(
        restarted,
        "managed PostgreSQL not restarted within 90 s of SIGKILL; log:\n{}",
        daemon.log_text()
    );
    println!(
        "postmaster killed: restarted and ready after {:?}",
        killed_at.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();

    let acks = acks.lock().unwrap().clone();
    let db = connect_db(&ws.database_url()).await;
    let rows = wait_all_stored(&db, &acks, Duration::from_secs(120)).await;
    let missing: Vec<&Ack> = acks.iter().filter(|a| !rows.contains_key(&a.id)).collect();
    println!(
        "database outage: {} accepted, {} stored, {} refused with 429",
        acks.len(),
        acks.len() - missing.len(),
        pace.refused_429.load(Ordering::SeqCst)
    );
    assert!(
        missing.is_empty(),
        "{} accepted conversations lost, e.g. {:?}; log:\n{}",
        missing.len(),
        &missing[..missing.len().min(5)],
        daemon.log_text()
    );
    db.close().await;
    assert!(daemon.terminate(Duration::from_secs(60)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_follows_the_store_rate_across_a_restart_and_refusals_are_not_losses() {
    // A slow backend (~250 ms a call, one worker, batches of 8): the
    // pipeline stores a few dozen a second while clients send 200 a
    // second. With 2 s of backlog allowed, the queue must admit about
    // 2 s of that rate, far below its capacity of 5,000.
    const CAPACITY: u64 = 5_000;
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &["--latency-ms", "250"]);
    let ws = Workspace::new();
    let addr = ws.write_config(
        &standin.url(),
        MODEL,
        DIMS,
        &format!(
            "[queue]\ncapacity = {CAPACITY}\nmax_backlog_seconds = 2\n\n[batch]\nmax_size = 8\nmax_wait_ms = 10\n\n[pipeline]\nworkers = 1\n"
        ),
    );
    let mut daemon = Daemon::start(&ws, &addr).await;
    let data = Arc::new(bodies());
    let acks: Arc<Mutex<Vec<Ack>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let pace = Arc::new(Pace::default());
    let load = tokio::spawn(paced_load(
        daemon.base_url(),
        "admission",
        200,
        stop.clone(),
        pace.clone(),
        acks.clone(),
        data.clone(),
    ));
    // Watch the limit while the load runs.
    let mut lowest_limit = u64::MAX;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let stats = daemon.stats().await;
        let limit = stats["queue"]["admission_limit"]
            .as_u64()
            .expect("admission_limit");
        lowest_limit = lowest_limit.min(limit);
    }
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let scraped = scrape(&daemon.base_url()).await;
    let accepted = pace.accepted.load(Ordering::SeqCst);
    let refused = pace.refused_429.load(Ordering::SeqCst);
    println!(
        "admission: lowest limit {lowest_limit}, accepted {accepted}, refused {refused}, rate estimate {}",
        scraped.value("convstore_queue_store_rate", &[])
    );
    assert!(
        lowest_limit < 1_000,
        "the limit must follow a store rate of tens a second, not stay at the capacity: {lowest_limit}"
    );
    assert!(
        lowest_limit >= 16,
        "never below two batches per worker: {lowest_limit}"
    );
    assert!(
        refused > 0 && accepted < CAPACITY,
        "refusals must come from the backlog limit, long before the capacity: accepted {accepted}, refused {refused}"
    );
    assert!(scraped.value("convstore_queue_admission_limit", &[]) < CAPACITY as f64);
    assert!(scraped.value("convstore_queue_store_rate", &[]) > 0.0);
    // A refusal is not a loss: every acknowledged conversation is stored.
    let acks = acks.lock().unwrap().clone();
    let db = connect_db(&ws.database_url()).await;
    let rows = wait_all_stored(&db, &acks, Duration::from_secs(120)).await;
    let missing = acks.iter().filter(|a| !rows.contains_key(&a.id)).count();
    assert_eq!(
        missing,
        0,
        "accepted conversations lost; log:\n{}",
        daemon.log_text()
    );
    assert_eq!(
        scraped.sum(
            "convstore_conversations_failed_total",
            &[("reason", "lost")]
        ),
        0.0
    );
    db.close().await;
    assert!(daemon.terminate(Duration::from_secs(60)).success());
    // The estimate outlives the process: restarted with no load at all, the
    // daemon admits by it from its first request, not by the capacity.
    let mut restarted = Daemon::start(&ws, &addr).await;
    let limit = restarted.stats().await["queue"]["admission_limit"]
        .as_u64()
        .expect("admission_limit");
    assert!(
        (16..1_000).contains(&limit),
        "a restarted daemon must admit by the saved store rate, not its capacity of {CAPACITY}: {limit}; log:\n{}",
        restarted.log_text()
    );
    assert!(restarted.terminate(Duration::from_secs(60)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedders_down_60s_stores_pending_then_backfills() {
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &[]);
    let ws = Workspace::new();
    // The [embedding] table is written by write_config: its keys for this
    // test come through the environment.
    let addr = ws.write_config(
        &standin.url(),
        MODEL,
        DIMS,
        "[journal]\nenabled = true\n\n[backfill]\ninterval_ms = 500\n\n[batch]\nmax_size = 16\nmax_wait_ms = 10\n",
    );
    let mut daemon = Daemon::start_with_env(
        &ws,
        &addr,
        &[
            ("CONVSTORE_EMBEDDING__MAX_WAIT_MS", "2000"),
            ("CONVSTORE_EMBEDDING__HEALTH_INTERVAL_MS", "500"),
            ("CONVSTORE_EMBEDDING__BREAKER_OPEN_MS", "200"),
            ("CONVSTORE_EMBEDDING__BREAKER_MAX_OPEN_MS", "1000"),
        ],
    )
    .await;
    let data = Arc::new(bodies());
    let acks: Arc<Mutex<Vec<Ack>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let pace = Arc::new(Pace::default());
    let load = tokio::spawn(paced_load(
        daemon.base_url(),
        "nobackend",
        20,
        stop.clone(),
        pace.clone(),
        acks.clone(),
        data.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    standin.set_faults(json!({"down": true})).await;
    let down_at = Instant::now();
    let db = connect_db(&ws.database_url()).await;
    let mut pending_seen = 0i64;
    while down_at.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pending: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM conversation_chunks WHERE embedding_status = 'pending'",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        pending_seen = pending_seen.max(pending);
    }
    standin.set_faults(json!({"down": false})).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    println!(
        "embedders down 60 s: {} accepted, up to {pending_seen} chunks pending",
        pace.accepted.load(Ordering::SeqCst)
    );
    assert!(
        pending_seen > 0,
        "nothing was stored as pending while every embedder was down"
    );
    assert_eq!(
        pace.refused_429.load(Ordering::SeqCst),
        0,
        "a backend outage must not refuse intake"
    );

    let acks = acks.lock().unwrap().clone();
    let rows = wait_all_stored(&db, &acks, Duration::from_secs(60)).await;
    let missing = acks.iter().filter(|a| !rows.contains_key(&a.id)).count();
    assert_eq!(
        missing,
        0,
        "accepted conversations lost; log:\n{}",
        daemon.log_text()
    );
    // The backfill embeds everything once the backend is back.
    let started = Instant::now();
    let left = loop {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM conversation_chunks WHERE embedding_status <> 'embedded'",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        if left == 0 || started.elapsed() > Duration::from_secs(120) {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!(
        "backfill done {:?} after the backend came back",
        started.elapsed()
    );
    assert_eq!(
        left,
        0,
        "chunks not backfilled; log:\n{}",
        daemon.log_text()
    );
    let rows = sqlx::query_as::<_, (String, String)>(
        "SELECT content, embedding::text FROM conversation_chunks",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    for (content, text) in &rows {
        let stored: Vec<f32> = text
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|x| x.parse().unwrap())
            .collect();
        assert_eq!(
            stored,
            convstore_standin::standin_vector(content, DIMS),
            "backfilled vector of {content:?}"
        );
    }
    db.close().await;
    assert!(daemon.terminate(Duration::from_secs(60)).success());
}

/// Small bodies, and a backend that is never given up on: with the backend
/// down, conversations stay in flight (retrying, and in the journal)
/// instead of being stored as pending, which is what happens as soon as
/// every breaker is open; so the breaker must stay closed.
const HELD_IN_FLIGHT: &[(&str, &str)] = &[
    ("CONVSTORE_SERVER__MAX_BODY_BYTES", "16384"),
    ("CONVSTORE_EMBEDDING__MAX_WAIT_MS", "600000"),
    ("CONVSTORE_EMBEDDING__BREAKER_FAILURES", "1000000"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_levels_in_flight_view_and_a_full_journal() {
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &[]);
    let ws = Workspace::new();
    let addr = ws.write_config(
        &standin.url(),
        MODEL,
        DIMS,
        "[journal]\nenabled = true\nmax_bytes = 40000\nsegment_bytes = 8192\n\n[ack]\ntimeout_ms = 20000\n",
    );
    let mut daemon = Daemon::start_with_env(&ws, &addr, HELD_IN_FLIGHT).await;
    let base = daemon.base_url();
    let http = reqwest::Client::new();
    let body = |id: &str| {
        json!({"id": id, "user_id": "u", "channel": "c",
               "messages": [{"role": "user", "content": format!("hello from {id}")}]})
    };

    // Stored: 201.
    let resp = http
        .post(format!("{base}/v1/conversations?wait=stored"))
        .json(&body("stored-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v, json!({"id": "stored-1", "status": "stored"}));
    let v: Value = http
        .get(format!("{base}/v1/conversations/stored-1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["status"], "stored");
    assert_eq!(v["chunks"][0]["embedding_status"], "embedded");

    // Durable: 202 "durable".
    let resp = http
        .post(format!("{base}/v1/conversations?wait=durable"))
        .json(&body("durable-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    assert_eq!(resp.json::<Value>().await.unwrap()["status"], "durable");

    // Every backend down: the next one stays in flight.
    standin.set_faults(json!({"down": true})).await;
    let resp = http
        .post(format!(
            "{base}/v1/conversations?wait=stored&timeout_ms=700"
        ))
        .json(&body("slow-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "wait_timeout");
    assert_eq!(v["error"]["id"], "slow-1");
    let v: Value = http
        .get(format!("{base}/v1/conversations/slow-1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["status"], "queued", "{v}");
    let resp = http
        .get(format!("{base}/v1/conversations/never-sent"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);

    // Fill the journal (40 kB) while nothing can be stored: 429 journal_full.
    let mut accepted = vec!["slow-1".to_string()];
    let mut full = None;
    for i in 0..200 {
        let id = format!("fill-{i}");
        let big = json!({"id": id, "user_id": "u", "channel": "c", "transcript": "x".repeat(2000)});
        let resp = http
            .post(format!("{base}/v1/conversations"))
            .json(&big)
            .send()
            .await
            .unwrap();
        match resp.status().as_u16() {
            202 => accepted.push(id),
            429 => {
                assert!(resp.headers().contains_key("retry-after"));
                full = Some(resp.json::<Value>().await.unwrap());
                break;
            }
            other => panic!("{other}: {}", resp.text().await.unwrap()),
        }
    }
    let full = full.expect("the journal never filled");
    assert_eq!(full["error"]["code"], "journal_full", "{full}");
    let (status, ready) = readyz(&base).await;
    assert_eq!(status, 503, "{ready}");
    assert!(ready["reasons"].to_string().contains("journal"), "{ready}");

    // Backend back: everything drains, the journal frees up.
    standin.set_faults(json!({"down": false})).await;
    let db = connect_db(&ws.database_url()).await;
    let started = Instant::now();
    loop {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM conversations WHERE client_id = ANY($1)")
                .bind(&accepted)
                .fetch_one(&db)
                .await
                .unwrap();
        if n == accepted.len() as i64 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{n}/{} stored",
            accepted.len()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let resp = http
        .post(format!("{base}/v1/conversations?wait=stored"))
        .json(&body("after-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        201,
        "the journal must accept again once stored"
    );
    // Batch with wait=stored: 201 and every item stored.
    let items: Vec<Value> = (0..5).map(|i| body(&format!("batch-{i}"))).collect();
    let resp = http
        .post(format!("{base}/v1/conversations/batch?wait=stored"))
        .json(&items)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["status"] == "stored"),
        "{v}"
    );
    db.close().await;
    assert!(daemon.terminate(Duration::from_secs(60)).success());
    let names: HashSet<String> = segments_in(&ws.path().join("state/journal"))
        .into_iter()
        .collect();
    assert!(
        names.is_empty(),
        "journal not emptied at a clean stop: {names:?}"
    );
}

/// A refusal is not a loss: with the journal on, every 429 `journal_full`
/// (a single conversation, one waiting for `stored`, the items of a batch)
/// used to drop its ticket and count `reason="lost"` with an ERROR saying
/// the journal is off, firing the data-loss alerts when nothing was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_with_the_journal_on_are_not_losses() {
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &[]);
    let ws = Workspace::new();
    let addr = ws.write_config(
        &standin.url(),
        MODEL,
        DIMS,
        "[journal]\nenabled = true\nmax_bytes = 40000\nsegment_bytes = 8192\n",
    );
    let mut daemon = Daemon::start_with_env(&ws, &addr, HELD_IN_FLIGHT).await;
    let base = daemon.base_url();
    let http = reqwest::Client::new();
    let big = |id: &str| json!({"id": id, "user_id": "u", "channel": "c", "transcript": "x".repeat(2000)});
    standin.set_faults(json!({"down": true})).await;

    // Fill the journal.
    let mut accepted = Vec::new();
    let mut filled = false;
    for i in 0..200 {
        let id = format!("fill-{i}");
        let resp = http
            .post(format!("{base}/v1/conversations"))
            .json(&big(&id))
            .send()
            .await
            .unwrap();
        match resp.status().as_u16() {
            202 => accepted.push(id),
            429 => {
                filled = true;
                break;
            }
            other => panic!("{other}: {}", resp.text().await.unwrap()),
        }
    }
    assert!(filled, "the journal never filled");

    // Refusals of every kind the ingest API has.
    const SINGLES: usize = 10;
    for i in 0..SINGLES {
        let wait = if i % 2 == 0 { "" } else { "?wait=stored" };
        let resp = http
            .post(format!("{base}/v1/conversations{wait}"))
            .json(&big(&format!("refused-{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 429);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "journal_full", "{v}");
    }
    let items: Vec<Value> = (0..5).map(|i| big(&format!("refused-batch-{i}"))).collect();
    let resp = http
        .post(format!("{base}/v1/conversations/batch"))
        .json(&items)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["rejected"], 5, "{v}");

    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let scrape = support::exposition::Scrape::parse(&text).expect("metrics parse");
    let lost = scrape.value(
        "convstore_conversations_failed_total",
        &[("reason", "lost")],
    );
    let refused_requests = scrape.sum(
        "convstore_ingest_requests_total",
        &[("outcome", "journal_full")],
    );
    let refused_singles = scrape.sum(
        "convstore_ingest_conversations_total",
        &[("outcome", "journal_full")],
    );
    println!(
        "lost {lost}, journal_full requests {refused_requests}, journal_full conversations {refused_singles}"
    );
    assert_eq!(lost, 0.0, "refusals were counted as lost");
    // The filling loop's last request, the singles, and the batch.
    assert_eq!(refused_requests, (SINGLES + 2) as f64);
    assert_eq!(refused_singles, (SINGLES + 1) as f64);
    let log = daemon.log_text();
    assert!(
        !log.contains("left the pipeline without being stored"),
        "a refusal was logged as a loss:\n{log}"
    );

    // Nothing accepted is lost either: back up, all of it is stored.
    standin.set_faults(json!({"down": false})).await;
    let db = connect_db(&ws.database_url()).await;
    let started = Instant::now();
    loop {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM conversations WHERE client_id = ANY($1)")
                .bind(&accepted)
                .fetch_one(&db)
                .await
                .unwrap();
        if n == accepted.len() as i64 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{n}/{} stored",
            accepted.len()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    db.close().await;
    assert!(daemon.terminate(Duration::from_secs(60)).success());
}

/// Not a test: the journal's cost on acknowledgement latency, `queued`
/// without the journal, `queued` and `durable` with it, one connection and
/// sixteen. Prints p50/p99; run by hand:
///   cargo test --release --test durability -- --ignored --nocapture ack_latency
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, run by hand"]
async fn ack_latency_queued_vs_durable() {
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &[]);
    let data = Arc::new(bodies());
    println!("\n| journal | ?wait= | connections | requests | p50 µs | p99 µs |");
    println!("|---|---|---|---|---|---|");
    for journal in [false, true] {
        let ws = Workspace::new();
        let addr = ws.write_config(
            &standin.url(),
            MODEL,
            DIMS,
            &format!("[journal]\nenabled = {journal}\n\n[queue]\ncapacity = 100000\nmax_backlog_seconds = 0\n"),
        );
        let mut daemon = Daemon::start(&ws, &addr).await;
        let levels: &[&str] = if journal {
            &["queued", "durable"]
        } else {
            &["queued"]
        };
        for level in levels {
            for connections in [1usize, 16] {
                let per_connection = 4000 / connections;
                let mut tasks = Vec::new();
                for c in 0..connections {
                    let base = daemon.base_url();
                    let data = data.clone();
                    let level = level.to_string();
                    tasks.push(tokio::spawn(async move {
                        let client = reqwest::Client::new();
                        let mut lat = Vec::with_capacity(per_connection);
                        for n in 0..per_connection {
                            let id = format!("lat-{level}-{connections}-{c}-{n}");
                            let body = serde_json::to_vec(&with_ids(
                                &data[n % data.len()],
                                Some(&id),
                                "u",
                            ))
                            .unwrap();
                            let started = Instant::now();
                            let resp = client
                                .post(format!("{base}/v1/conversations?wait={level}"))
                                .header("content-type", "application/json")
                                .body(body)
                                .send()
                                .await
                                .unwrap();
                            assert!(resp.status().is_success(), "{}", resp.status());
                            let _ = resp.bytes().await;
                            lat.push(started.elapsed());
                        }
                        lat
                    }));
                }
                let mut all = Vec::new();
                for t in tasks {
                    all.extend(t.await.unwrap());
                }
                all.sort();
                let q =
                    |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_micros();
                println!(
                    "| {} | {level} | {connections} | {} | {} | {} |",
                    if journal { "on" } else { "off" },
                    all.len(),
                    q(0.50),
                    q(0.99)
                );
            }
        }
        assert!(daemon.terminate(Duration::from_secs(120)).success());
    }
}

/// A small tmpfs mounted over a directory, unmounted (lazily, so a process
/// still holding a file cannot keep it) when dropped.
struct SmallDisk {
    path: std::path::PathBuf,
}

impl SmallDisk {
    /// Mounts a `size` tmpfs on `path`; `None` with the reason printed
    /// where that is not possible. CI runs as root and must run the test.
    fn mount(path: &Path, size: &str) -> Option<SmallDisk> {
        let skip = |why: String| {
            if std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false") {
                panic!("{why}; CI must run this test");
            }
            eprintln!("\n{}\nSKIPPED: {why}\n{}\n", "!".repeat(78), "!".repeat(78));
            None
        };
        // SAFETY: geteuid(2) reads a number; no memory is involved.
        if unsafe { libc::geteuid() } != 0 {
            return skip("the disk-full test mounts a tmpfs and needs root".into());
        }
        std::fs::create_dir_all(path).expect("journal directory");
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(SmallDisk {
                path: path.to_path_buf(),
            }),
            Ok(o) => skip(format!(
                "cannot mount a tmpfs on {} ({}): {}",
                path.display(),
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => skip(format!("cannot run mount: {e}")),
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// Rows per client id among `ids`.
async fn rows_by_client_id(db: &PgPool, ids: &[String]) -> HashMap<String, i64> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT client_id, count(*) FROM conversations WHERE client_id = ANY($1) GROUP BY client_id",
    )
    .bind(ids)
    .fetch_all(db)
    .await
    .expect("count by client id");
    rows.into_iter().collect()
}

/// Waits until each of `ids` has a row; then every one must have exactly one.
async fn assert_stored_once(db: &PgPool, ids: &[String], limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let rows = rows_by_client_id(db, ids).await;
        if rows.len() == ids.len() {
            let twice: Vec<_> = rows.iter().filter(|(_, n)| **n != 1).collect();
            assert!(twice.is_empty(), "stored more than once: {twice:?}");
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{} of {} acknowledged conversations stored after {limit:?}; missing e.g. {:?}",
            rows.len(),
            ids.len(),
            ids.iter().find(|id| !rows.contains_key(*id))
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn scrape(base: &str) -> Scrape {
    support::exposition::scrape(&reqwest::Client::new(), base).await
}

/// Posts ~3 KB conversations `tag-N` (every fifth `?wait=durable`) until
/// the journal refuses one; returns the acknowledged ids and the refusal.
async fn fill_the_disk(base: &str, tag: &str) -> (Vec<String>, Value) {
    let http = reqwest::Client::new();
    let mut acked = Vec::new();
    for n in 0..5000 {
        let id = format!("{tag}-{n}");
        let wait = if n % 5 == 4 { "durable" } else { "queued" };
        let body = json!({"id": id, "user_id": "u-disk", "channel": "c",
                          "transcript": format!("{id} {}", "x".repeat(3000))});
        let resp = http
            .post(format!("{base}/v1/conversations?wait={wait}"))
            .json(&body)
            .send()
            .await
            .expect("post");
        match resp.status().as_u16() {
            202 => acked.push(id),
            503 => {
                let retry_after = resp.headers().contains_key("retry-after");
                let v: Value = resp.json().await.expect("503 body");
                assert!(
                    retry_after,
                    "a 503 for a full journal must carry Retry-After: {v}"
                );
                return (acked, v);
            }
            other => panic!("{id}: unexpected {other}: {}", resp.text().await.unwrap()),
        }
    }
    panic!("5000 conversations of 3 KB did not fill a 2 MiB journal disk");
}

/// Polls `/readyz` until it answers `status` (generous deadline); the body
/// and how long it took.
async fn readyz_until(base: &str, status: u16, limit: Duration) -> (Value, Duration) {
    let started = Instant::now();
    loop {
        let (s, v) = readyz(base).await;
        if s == status {
            return (v, started.elapsed());
        }
        assert!(
            started.elapsed() < limit,
            "/readyz still {s} after {limit:?}, expected {status}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The journal directory on a 2 MiB tmpfs (PostgreSQL lives elsewhere),
/// the default 16 MiB segment size: the journal's own active segment fills
/// the disk while the embedding backend is down (nothing is stored).
/// (a) posts get 503 `journal_unwritable` with Retry-After, `/readyz` and
/// `/v1/stats` name the journal, nothing is counted lost; (b) storage
/// resumes: the journal frees its segment and takes conversations again
/// without a restart; (c) full again, kill -9, restart on the full disk:
/// the daemon starts, replays, and every acknowledged conversation is
/// stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_disk_full_on_a_small_filesystem() {
    let ws = Workspace::new();
    let Some(_disk) = SmallDisk::mount(&ws.path().join("state/journal"), "2m") else {
        return;
    };
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &[]);
    let addr = ws.write_config(&standin.url(), MODEL, DIMS, "[journal]\nenabled = true\n");
    // Backend down: conversations stay in flight (retrying) instead of
    // being stored as pending, so the breaker must stay closed.
    let env = [
        ("CONVSTORE_EMBEDDING__MAX_WAIT_MS", "600000"),
        ("CONVSTORE_EMBEDDING__BREAKER_FAILURES", "1000000"),
    ];
    let mut daemon = Daemon::start_with_env(&ws, &addr, &env).await;
    let base = daemon.base_url();
    let db = connect_db(&ws.database_url()).await;
    let mut acked: Vec<String> = Vec::new();

    // (a) The disk fills.
    standin.set_faults(json!({"down": true})).await;
    let (ids, refusal) = fill_the_disk(&base, "a").await;
    acked.extend(ids);
    println!(
        "(a) disk full after {} conversations: {refusal}",
        acked.len()
    );
    assert_eq!(refusal["error"]["code"], "journal_unwritable", "{refusal}");
    // Refused at once from now on, each with Retry-After.
    let http = reqwest::Client::new();
    for n in 0..5 {
        let resp = http
            .post(format!("{base}/v1/conversations"))
            .json(
                &json!({"id": format!("refused-{n}"), "user_id": "u-disk", "channel": "c",
                          "messages": [{"role": "user", "content": "hi"}]}),
            )
            .send()
            .await
            .unwrap();
        let retry_after = resp.headers().contains_key("retry-after");
        let (status, body) = (resp.status(), resp.text().await.unwrap());
        assert_eq!(status, 503, "{body}");
        assert!(retry_after, "{body}");
        assert!(body.contains("journal_unwritable"), "{body}");
    }
    let (status, ready) = readyz(&base).await;
    assert_eq!(status, 503, "{ready}");
    let reasons = ready["reasons"].to_string();
    assert!(
        reasons.contains("journal cannot write") && reasons.contains("os error 28"),
        "readiness must name the journal and the error: {ready}"
    );
    assert_eq!(ready["journal"]["writable"], false, "{ready}");
    let stats: Value = reqwest::get(format!("{base}/v1/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        stats["health"]["reasons"]
            .to_string()
            .contains("journal_unwritable"),
        "{}",
        stats["health"]
    );
    let metrics = scrape(&base).await;
    assert_eq!(metrics.value("convstore_journal_writable", &[]), 0.0);
    assert_eq!(
        metrics.value(
            "convstore_conversations_failed_total",
            &[("reason", "lost")]
        ),
        0.0
    );

    // (b) Storage resumes: stored records free the segment, no restart.
    let resumed = Instant::now();
    standin.set_faults(json!({"down": false})).await;
    let (_, ready_after) = readyz_until(&base, 200, Duration::from_secs(180)).await;
    let resp = http
        .post(format!("{base}/v1/conversations?wait=stored"))
        .json(
            &json!({"id": "b-after", "user_id": "u-disk", "channel": "c",
                      "messages": [{"role": "user", "content": "back"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "{:?}", resp.text().await);
    let accepting_after = resumed.elapsed();
    acked.push("b-after".into());
    let stored_after = assert_stored_once(&db, &acked, Duration::from_secs(180)).await;
    println!(
        "(b) after storage resumed: /readyz 200 in {:.2} s, a post stored (201) at {:.2} s; all {} acknowledged stored once",
        ready_after.as_secs_f64(),
        accepting_after.as_secs_f64(),
        acked.len()
    );
    let _ = stored_after;
    let metrics = scrape(&base).await;
    assert_eq!(metrics.value("convstore_journal_writable", &[]), 1.0);

    // (c) Full again, then kill -9 and a restart on the full disk.
    standin.set_faults(json!({"down": true})).await;
    let (ids, refusal) = fill_the_disk(&base, "c").await;
    assert_eq!(refusal["error"]["code"], "journal_unwritable", "{refusal}");
    println!("(c) disk full again after {} more conversations", ids.len());
    acked.extend(ids);
    assert_eq!(
        scrape(&base).await.value(
            "convstore_conversations_failed_total",
            &[("reason", "lost")]
        ),
        0.0
    );
    daemon.kill9();
    standin.set_faults(json!({"down": false})).await;
    let restarted = Instant::now();
    let mut daemon = Daemon::spawn(&ws, &addr, &env);
    daemon.wait_ready(Duration::from_secs(180)).await;
    let ready_in = restarted.elapsed();
    let stored_in = assert_stored_once(&db, &acked, Duration::from_secs(180)).await + ready_in;
    let log = daemon.log_text();
    assert!(
        log.contains("Journal replayed"),
        "no replay in the log:\n{log}"
    );
    assert!(
        log.contains("creating a segment at start-up") && log.contains("Journal writable again"),
        "the restart found room for a new segment: the disk was not full\n{log}"
    );
    println!(
        "(c) restart on the full disk: ready in {:.2} s, all {} acknowledged stored exactly once at {:.2} s",
        ready_in.as_secs_f64(),
        acked.len(),
        stored_in.as_secs_f64()
    );
    let resp = http
        .post(format!(
            "{}/v1/conversations?wait=stored",
            daemon.base_url()
        ))
        .json(
            &json!({"id": "c-after", "user_id": "u-disk", "channel": "c",
                      "messages": [{"role": "user", "content": "again"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(
        scrape(&daemon.base_url()).await.value(
            "convstore_conversations_failed_total",
            &[("reason", "lost")]
        ),
        0.0
    );
    db.close().await;
    assert!(daemon.terminate(Duration::from_secs(60)).success());
    let left = segments_in(&ws.path().join("state/journal"));
    assert!(
        left.is_empty(),
        "journal not emptied at a clean stop: {left:?}"
    );
}

/// A statement that waits on the database forever (here: behind a lock
/// another session holds on `conversations`) does not hold the exit past
/// the drain deadline. The daemon names what it did not store, exits 1
/// after the deadline and its bounded closing steps, and stops its cluster.
/// Before the pool's close was bounded, it waited for those connections
/// as long as the lock was held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_while_a_lock_blocks_every_write() {
    const POSTS: usize = 20;
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &[]);
    let ws = Workspace::new();
    let addr = ws.write_config(
        &standin.url(),
        MODEL,
        DIMS,
        "[shutdown]\ntimeout_ms = 2000\n\n[batch]\nmax_size = 8\nmax_wait_ms = 10\n",
    );
    let mut daemon = Daemon::start(&ws, &addr).await;
    let base = daemon.base_url();
    let db = connect_db(&ws.database_url()).await;
    let mut lock = db.begin().await.unwrap();
    sqlx::query("LOCK TABLE conversations IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();

    let http = reqwest::Client::new();
    for (i, body) in bodies().iter().take(POSTS).enumerate() {
        let resp = http
            .post(format!("{base}/v1/conversations"))
            .json(&with_ids(body, Some(&format!("locked-{i}")), "locked"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            202,
            "post {i}: {}",
            resp.text().await.unwrap()
        );
    }
    // Until a batch waits on the lock inside PostgreSQL.
    let waiting = Instant::now();
    loop {
        let in_flight = scrape(&base)
            .await
            .sum("convstore_pipeline_in_flight_conversations", &[]);
        if in_flight > 0.0 {
            break;
        }
        assert!(
            waiting.elapsed() < Duration::from_secs(30),
            "no batch reached the database"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let stopping = Instant::now();
    // Generous: the deadline (2 s), the listeners' and background tasks'
    // 5 s, the pool's 5 s and the cluster's stop fit many times over.
    let status = daemon.terminate(Duration::from_secs(90));
    println!(
        "exited with {status:?} {:?} after SIGTERM",
        stopping.elapsed()
    );
    let log = daemon.log_text();
    assert_eq!(
        status.code(),
        Some(1),
        "a drain that did not store everything exits 1; log:\n{log}"
    );
    assert!(
        log.contains("Shutdown deadline passed"),
        "the log names what was not stored:\n{log}"
    );
    assert!(
        log.contains("Database connections still busy after the drain"),
        "the log says why the pool did not close:\n{log}"
    );
    // The cluster stopped: the session holding the lock is gone with it.
    assert!(
        sqlx::query("SELECT 1").execute(&mut *lock).await.is_err(),
        "the managed cluster still answers after the daemon exited"
    );
}
