//! The shared intake on NATS JetStream (docs/SCALING.md), against real
//! `nats-server` processes, a real PostgreSQL (one cluster every instance
//! shares, as `database.url`) and real daemon processes:
//!
//! - three instances, posts round-robin at `?wait=durable`, one instance
//!   killed -9 mid-load and restarted: every acknowledged conversation is
//!   stored exactly once, and every live instance stored some;
//! - the broker killed -9 and restarted under load: nothing acknowledged
//!   is lost;
//! - a three-node JetStream cluster (R3) with its stream leader killed:
//!   nothing acknowledged is lost;
//! - across instances: `?wait=stored` answered by whichever instance
//!   committed, appends in order, deletes, a poison message kept as a dead
//!   letter, a full stream answering 429, and the managed database refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::cluster::TestCluster;
use support::daemon::{BIN, Daemon, Standin, Workspace, connect_db, wait_for_count};
use support::exposition::scrape;
use support::nats::{NatsCluster, NatsServer};

const MODEL: &str = "shared-embed";
const DIMS: usize = 32;
const CONTEXT: usize = 512;

fn instance_config(pg_url: &str, nats_url: &str, extra: &str) -> String {
    format!(
        "[database]\nurl = \"{pg_url}\"\npool_size = 4\n\n[nats]\nurl = \"{nats_url}\"\nack_wait = \"3s\"\n\n[batch]\nmax_wait_ms = 20\n\n{extra}\n"
    )
}

/// One instance: its own workspace (config, socket, logs), the shared
/// database and stream.
async fn instance(
    standin: &Standin,
    pg_url: &str,
    nats_url: &str,
    extra: &str,
) -> (Workspace, Daemon) {
    let ws = Workspace::new();
    let addr = ws.write_config(
        &standin.url(),
        MODEL,
        DIMS,
        &instance_config(pg_url, nats_url, extra),
    );
    let daemon = Daemon::start(&ws, &addr).await;
    (ws, daemon)
}

fn conversation(i: usize) -> Value {
    json!({
        "id": format!("conv-{i}"),
        "user_id": format!("user-{}", i % 7),
        "channel": "web",
        "messages": [
            {"role": "user", "content": format!("question number {i}: where is my parcel?")},
            {"role": "assistant", "content": format!("answer {i}: it left the depot this morning")}
        ]
    })
}

/// Posts `ids` round-robin over `bases` at `?wait=durable`, `concurrency`
/// at a time; the ids the daemons acknowledged (202).
async fn post_round_robin(
    bases: Vec<String>,
    ids: Vec<usize>,
    concurrency: usize,
) -> BTreeSet<usize> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let queue = Arc::new(std::sync::Mutex::new(ids.into_iter()));
    let acked = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let (http, queue, acked, bases) =
            (http.clone(), queue.clone(), acked.clone(), bases.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(i) = queue.lock().unwrap().next() else {
                    break;
                };
                let base = &bases[(i + worker) % bases.len()];
                let answer = http
                    .post(format!("{base}/v1/conversations?wait=durable"))
                    .json(&conversation(i))
                    .send()
                    .await;
                if let Ok(resp) = answer
                    && resp.status() == 202
                {
                    acked.lock().unwrap().insert(i);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    Arc::try_unwrap(acked).unwrap().into_inner().unwrap()
}

/// Every acknowledged id is stored exactly once (no row twice, none
/// missing), waiting up to `limit` for the workers to catch up.
async fn assert_stored_exactly_once(pool: &sqlx::PgPool, acked: &BTreeSet<usize>, limit: Duration) {
    let started = Instant::now();
    loop {
        let ids: Vec<String> =
            sqlx::query_scalar("SELECT client_id FROM conversations WHERE client_id LIKE 'conv-%'")
                .fetch_all(pool)
                .await
                .unwrap();
        let stored: BTreeSet<usize> = ids
            .iter()
            .filter_map(|id| id.strip_prefix("conv-")?.parse().ok())
            .collect();
        assert_eq!(stored.len(), ids.len(), "a conversation is stored twice");
        let missing: Vec<&usize> = acked.difference(&stored).collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            started.elapsed() < limit,
            "{} acknowledged conversations not stored after {limit:?}, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn metric_sum(base: &str, name: &str) -> f64 {
    scrape(&reqwest::Client::new(), base).await.sum(name, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_with_one_killed_store_every_acknowledged_conversation_once() {
    let pg = TestCluster::start().await;
    let nats = NatsServer::start();
    // An Ollama-like latency, so batches are in flight when one dies.
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &["--latency-ms", "30"]);
    let (_wa, a) = instance(&standin, &pg.url(), &nats.url(), "").await;
    let (wb, mut b) = instance(&standin, &pg.url(), &nats.url(), "").await;
    let (_wc, c) = instance(&standin, &pg.url(), &nats.url(), "").await;
    let bases = vec![a.base_url(), b.base_url(), c.base_url()];
    let total = 900;

    let load = tokio::spawn(post_round_robin(bases.clone(), (0..total).collect(), 6));
    // Kill B -9 while it holds pulled, unacknowledged work.
    let started = Instant::now();
    while metric_sum(&b.base_url(), "convstore_nats_messages_pulled_total").await < 50.0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "B pulled nothing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.kill9();
    let acked = load.await.unwrap();
    assert!(
        acked.len() >= total * 6 / 10,
        "too few acknowledged: {}",
        acked.len()
    );
    assert!(
        acked.len() < total,
        "posts to the killed instance were acknowledged"
    );

    let pool = connect_db(&pg.url()).await;
    // B's pulled changes come back after nats.ack_wait (3 s) to A and C.
    assert_stored_exactly_once(&pool, &acked, Duration::from_secs(120)).await;
    let redelivered = metric_sum(&a.base_url(), "convstore_nats_messages_redelivered_total").await
        + metric_sum(&c.base_url(), "convstore_nats_messages_redelivered_total").await;
    let stored_a = metric_sum(&a.base_url(), "convstore_conversations_stored_total").await;
    let stored_c = metric_sum(&c.base_url(), "convstore_conversations_stored_total").await;
    assert!(
        stored_a > 0.0 && stored_c > 0.0,
        "every live instance stored some: A {stored_a}, C {stored_c}"
    );

    // B restarted: it joins the consumer again and takes new work.
    let mut b = Daemon::start(&wb, &b.http_addr.clone()).await;
    let more = post_round_robin(vec![b.base_url()], (total..total + 60).collect(), 4).await;
    assert_eq!(more.len(), 60);
    let mut all = acked.clone();
    all.extend(more);
    assert_stored_exactly_once(&pool, &all, Duration::from_secs(60)).await;
    let stored_b = metric_sum(&b.base_url(), "convstore_conversations_stored_total").await;
    eprintln!(
        "three instances: {} posted, {} acknowledged, {} stored distinct; redelivered to A and C: {redelivered}; stored by A {stored_a}, C {stored_c}, B after restart {stored_b}",
        total + 60,
        all.len(),
        all.len()
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM conversations")
        .fetch_one(&pool)
        .await
        .unwrap();
    // A post B published just before its kill may have reached the stream
    // without its answer reaching the client: stored once, unacknowledged.
    assert!(
        rows as usize >= all.len() && rows as usize <= all.len() + 6,
        "{rows} rows for {} acknowledged (at most the 6 posts in flight at the kill more)",
        all.len()
    );
    // A graceful stop acknowledges what its drain stored before it exits:
    // nothing it stored is delivered again after ack_wait. A change it
    // stored that came again would reach A or C as an unchanged repeat, a
    // duplicate. A message B was handed but had not stored when it stopped
    // may come again (that is how it is not lost): A or C stores it, once.
    let repeats = |base: String| async move {
        (
            metric_sum(&base, "convstore_conversations_duplicate_total").await,
            metric_sum(&base, "convstore_nats_messages_redelivered_total").await,
        )
    };
    let (duplicates_a, redelivered_a) = repeats(a.base_url()).await;
    let (duplicates_c, redelivered_c) = repeats(c.base_url()).await;
    let (duplicates_before, redelivered_before) =
        (duplicates_a + duplicates_c, redelivered_a + redelivered_c);
    // Those so far include the changes B stored but had not acknowledged
    // when it was killed: delivered again, and counted as repeats.
    eprintln!(
        "before B's graceful stop: A and C counted {duplicates_before} repeats in {redelivered_before} redeliveries"
    );
    let late: Vec<usize> = (total + 100..total + 300).collect();
    let http = reqwest::Client::new();
    for i in &late {
        let resp = http
            .post(format!("{}/v1/conversations", b.base_url()))
            .json(&conversation(*i))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202);
    }
    assert!(b.terminate(Duration::from_secs(30)).success());
    all.extend(late);
    assert_stored_exactly_once(&pool, &all, Duration::from_secs(60)).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream("CONVSTORE").await.unwrap();
    let started = Instant::now();
    loop {
        let mut consumer: async_nats::jetstream::consumer::PullConsumer =
            stream.get_consumer("convstore").await.unwrap();
        let info = consumer.info().await.unwrap();
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "left in the stream: {} pending, {} unacknowledged",
            info.num_pending,
            info.num_ack_pending
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Past ack_wait (3 s): nothing B stored came again to A or C.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (duplicates_a, redelivered_a) = repeats(a.base_url()).await;
    let (duplicates_c, redelivered_c) = repeats(c.base_url()).await;
    let (duplicates_after, redelivered_after) =
        (duplicates_a + duplicates_c, redelivered_a + redelivered_c);
    assert_eq!(
        duplicates_after, duplicates_before,
        "changes B stored while stopping were delivered again (redelivered to A and C: {redelivered_before} before B stopped, {redelivered_after} after)"
    );
    // And a stored change that does come again is counted so: one of B's
    // late posts, posted again to A, reaches A or C through the stream as a
    // repeat.
    let resp = http
        .post(format!("{}/v1/conversations", a.base_url()))
        .json(&conversation(total + 100))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let started = Instant::now();
    loop {
        let (duplicates_a, _) = repeats(a.base_url()).await;
        let (duplicates_c, _) = repeats(c.base_url()).await;
        if duplicates_a + duplicates_c == duplicates_after + 1.0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a stored change posted again was not counted as a repeat: {} repeats, {duplicates_after} before",
            duplicates_a + duplicates_c
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_killed_and_restarted_under_load_loses_nothing_acknowledged() {
    let pg = TestCluster::start().await;
    let mut nats = NatsServer::start();
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &["--latency-ms", "10"]);
    let (_wa, a) = instance(&standin, &pg.url(), &nats.url(), "").await;
    let (_wb, b) = instance(&standin, &pg.url(), &nats.url(), "").await;
    let bases = vec![a.base_url(), b.base_url()];
    let total = 800;
    let load = tokio::spawn(post_round_robin(bases, (0..total).collect(), 6));
    tokio::time::sleep(Duration::from_millis(700)).await;
    nats.node.kill9();
    tokio::time::sleep(Duration::from_millis(800)).await;
    nats.node.restart();
    let acked = load.await.unwrap();
    assert!(!acked.is_empty());
    let pool = connect_db(&pg.url()).await;
    assert_stored_exactly_once(&pool, &acked, Duration::from_secs(120)).await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM conversations")
        .fetch_one(&pool)
        .await
        .unwrap();
    eprintln!(
        "broker kill -9: {total} posted, {} acknowledged, {rows} rows (acknowledged and stored: all)",
        acked.len()
    );
    // A refused post may still have reached the stream before the broker
    // died (the client heard 503 and may send it again): stored at most
    // once, never more.
    assert!(rows as usize >= acked.len() && rows as usize <= total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_r3_cluster_loses_nothing_acknowledged_when_its_stream_leader_dies() {
    let pg = TestCluster::start().await;
    let mut cluster = NatsCluster::start();
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &["--latency-ms", "10"]);
    let urls = cluster.urls();
    let r3 = |pg: &str| {
        format!(
            "[database]\nurl = \"{pg}\"\npool_size = 4\n\n[nats]\nurl = \"{urls}\"\nack_wait = \"3s\"\nreplicas = 3\n\n[batch]\nmax_wait_ms = 20\n"
        )
    };
    let start = |cfg: String| {
        let standin_url = standin.url();
        async move {
            let ws = Workspace::new();
            let addr = ws.write_config(&standin_url, MODEL, DIMS, &cfg);
            let started = Instant::now();
            // The cluster elects its meta leader in a second or two (more
            // on a loaded machine); a daemon that finds JetStream not ready
            // yet exits, and is started again.
            loop {
                let mut d = Daemon::spawn(&ws, &addr, &[]);
                if d.try_wait_ready(Duration::from_secs(19)).await.is_ok() {
                    return (ws, d);
                }
                d.kill9();
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "no daemon ready on the cluster"
                );
            }
        }
    };
    let (_wa, a) = start(r3(&pg.url())).await;
    let (_wb, b) = start(r3(&pg.url())).await;

    let client = async_nats::connect(cluster.nodes[0].url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("CONVSTORE").await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.num_replicas, 3);
    let leader = info
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("a stream leader");

    let total = 600;
    let load = tokio::spawn(post_round_robin(
        vec![a.base_url(), b.base_url()],
        (0..total).collect(),
        6,
    ));
    tokio::time::sleep(Duration::from_millis(600)).await;
    cluster.node_named(&leader).expect("leader node").kill9();
    let mut acked = load.await.unwrap();
    let during = acked.len();
    // Posts refused while the new leader was elected (503) are the
    // client's to send again; once it is, the two nodes left serve.
    let started = Instant::now();
    let after = loop {
        let more = post_round_robin(
            vec![a.base_url(), b.base_url()],
            (total..total + 100).collect(),
            4,
        )
        .await;
        if more.len() == 100 {
            break more;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the cluster did not serve again after its leader died: {} of 100",
            more.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    acked.extend(after);
    let pool = connect_db(&pg.url()).await;
    assert_stored_exactly_once(&pool, &acked, Duration::from_secs(120)).await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM conversations")
        .fetch_one(&pool)
        .await
        .unwrap();
    eprintln!(
        "R3 cluster, leader {leader} killed: {total} posted during the failover, {during} acknowledged; then 100 of 100; {} acknowledged in all, {rows} rows",
        acked.len()
    );
    assert!(rows as usize <= total + 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_share_waits_appends_deletes_dead_letters_and_limits() {
    let pg = TestCluster::start().await;
    let nats = NatsServer::start();
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &[]);
    let (_wa, a) = instance(&standin, &pg.url(), &nats.url(), "").await;
    let (_wb, b) = instance(&standin, &pg.url(), &nats.url(), "").await;
    let http = reqwest::Client::new();
    let pool = connect_db(&pg.url()).await;

    // ?wait=stored through A: 201 whichever instance committed it.
    let resp = http
        .post(format!("{}/v1/conversations?wait=stored", a.base_url()))
        .json(&conversation(1))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());

    // Appends through B to a conversation posted through A, in order,
    // while its post may still be in the stream.
    let resp = http
        .post(format!("{}/v1/conversations", a.base_url()))
        .json(&conversation(2))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    for turn in 0..5 {
        let base = if turn % 2 == 0 {
            b.base_url()
        } else {
            a.base_url()
        };
        let resp = http
            .post(format!(
                "{base}/v1/conversations/conv-2/messages?wait=durable"
            ))
            .json(&json!({"messages": [{"role": "user", "content": format!("turn {turn}")}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
    }
    let started = Instant::now();
    loop {
        let resp = http
            .get(format!("{}/v1/conversations/conv-2", b.base_url()))
            .send()
            .await
            .unwrap();
        let body: Value = resp.json().await.unwrap();
        let contents: Vec<String> = body["messages"]
            .as_array()
            .map(|m| {
                m.iter()
                    .filter_map(|m| m["content"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if contents.len() == 7 {
            let turns: Vec<&String> = contents.iter().skip(2).collect();
            assert_eq!(
                turns,
                ["turn 0", "turn 1", "turn 2", "turn 3", "turn 4"],
                "appends in acknowledgement order"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "appends not applied: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // An append to an id no instance ever accepted: 404.
    let resp = http
        .post(format!(
            "{}/v1/conversations/never-posted/messages",
            b.base_url()
        ))
        .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);

    // A delete through B of a conversation posted through A.
    let resp = http
        .delete(format!("{}/v1/conversations/conv-1", b.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM conversations WHERE client_id = 'conv-1'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(n, 0);

    // A message that is not a change, put in the stream by someone else:
    // terminated and kept in dead_letters, not redelivered forever.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.publish("convstore.conversations.poison", "not a change".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let dead = wait_for_count(
        &pool,
        "SELECT count(*) FROM dead_letters",
        1,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(dead, 1);
    let payload: Vec<u8> = sqlx::query_scalar("SELECT payload FROM dead_letters")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(payload, b"not a change");
    let terminated = metric_sum(&a.base_url(), "convstore_nats_messages_terminated_total").await
        + metric_sum(&b.base_url(), "convstore_nats_messages_terminated_total").await;
    assert_eq!(terminated, 1.0);
    let started = Instant::now();
    while metric_sum(&a.base_url(), "convstore_dead_letters").await != 1.0 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "convstore_dead_letters never showed the dead letter"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // An erasure takes the user's dead letters too.
    sqlx::query("UPDATE dead_letters SET user_id = 'user-3'")
        .execute(&pool)
        .await
        .unwrap();
    let resp = http
        .delete(format!("{}/v1/users/user-3", a.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_letters")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(dead, 0);

    // A batch through the shared intake: every item sent, then every
    // acknowledgement awaited together; `stored` once all are committed.
    let mut batch: Vec<Value> = (3000..3100).map(conversation).collect();
    batch.push(json!({"user_id": "u", "channel": "web"}));
    let resp = http
        .post(format!(
            "{}/v1/conversations/batch?wait=stored",
            b.base_url()
        ))
        .json(&batch)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        (body["accepted"].as_u64(), body["rejected"].as_u64()),
        (Some(100), Some(1)),
        "{status} {body}"
    );
    assert_eq!(body["results"][0]["status"], "stored", "{body}");
    assert_eq!(body["results"][100]["status"], "rejected", "{body}");
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM conversations WHERE client_id LIKE 'conv-3___'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(n, 100);

    // A change PostgreSQL refuses for good (a NUL byte, which validation
    // would have refused at the door: this one was published by someone
    // else): terminated and kept whole in dead_letters, under its user.
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    let refused = json!({
        "v": 2, "kind": "post", "stamp": stamp as i64,
        "id": "7f0c1d2e-3b4a-5c6d-8e9f-0a1b2c3d4e5f", "client_id": "nul-1",
        "user_id": "user-nul", "channel": "web",
        "messages": [{"role": "user", "content": "a NUL \u{0} byte"}],
        "metadata": {}, "received_at": "2026-12-06T00:00:00Z"
    });
    js.publish(
        "convstore.conversations.refused",
        serde_json::to_vec(&refused).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let dead = wait_for_count(
        &pool,
        "SELECT count(*) FROM dead_letters WHERE user_id = 'user-nul'",
        1,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(dead, 1);
    let (key, reason): (Option<String>, String) = sqlx::query_as(
        "SELECT conversation_key, reason FROM dead_letters WHERE user_id = 'user-nul'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(key.as_deref(), Some("nul-1"));
    assert!(!reason.is_empty());
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM conversations WHERE client_id = 'nul-1'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 0);

    // /readyz and the metrics say the stream is there.
    let ready: Value = http
        .get(format!("{}/readyz", a.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["shared_intake"]["status"], "ok", "{ready}");
    let published = metric_sum(&a.base_url(), "convstore_nats_published_total").await;
    assert!(published >= 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_stream_answers_429_and_a_lost_broker_makes_the_instance_unready() {
    let pg = TestCluster::start().await;
    let mut nats = NatsServer::start();
    // A stream that holds 5 changes, and workers that cannot store (no
    // backend answers slower than the test): they stay in the stream.
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &["--latency-ms", "4000"]);
    let ws = Workspace::new();
    let cfg = format!(
        "[database]\nurl = \"{}\"\npool_size = 4\n\n[nats]\nurl = \"{}\"\nstream = \"SMALL\"\nsubject = \"small.conversations\"\nconsumer = \"small\"\nmax_messages = 5\n\n[queue]\ncapacity = 1\n",
        pg.url(),
        nats.url()
    );
    let addr = ws.write_config(&standin.url(), MODEL, DIMS, &cfg);
    let d = Daemon::start(&ws, &addr).await;
    let http = reqwest::Client::new();
    let mut statuses = Vec::new();
    for i in 0..12 {
        let resp = http
            .post(format!("{}/v1/conversations", d.base_url()))
            .json(&conversation(100 + i))
            .send()
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
        if resp.status() == 429 {
            assert!(resp.headers().contains_key("retry-after"));
            let body: Value = resp.json().await.unwrap();
            assert_eq!(body["error"]["code"], "queue_full", "{body}");
        }
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(
        statuses.iter().filter(|s| **s == 202).count() >= 5,
        "{statuses:?}"
    );

    nats.node.kill9();
    let started = Instant::now();
    loop {
        let resp = http
            .get(format!("{}/readyz", d.base_url()))
            .send()
            .await
            .unwrap();
        if resp.status() == 503 {
            let body: Value = resp.json().await.unwrap();
            assert!(
                body["reasons"].to_string().contains("shared intake"),
                "{body}"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "still ready without a broker"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let resp = http
        .post(format!("{}/v1/conversations", d.base_url()))
        .json(&conversation(500))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503, "no broker, no acknowledgement");
}

#[test]
fn the_managed_database_is_refused_with_a_shared_intake() {
    let ws = Workspace::new();
    let _ = ws.write_config(
        "http://127.0.0.1:9",
        MODEL,
        DIMS,
        "[nats]\nurl = \"nats://127.0.0.1:4222\"\n",
    );
    let out = std::process::Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(ws.config_path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nats.url") && err.contains("database.url"),
        "{err}"
    );
}

/// JetStream reserves a stream's whole `max_bytes` at creation: a stream
/// the server cannot hold stops the start-up with both numbers named, not
/// a bare "insufficient storage". The test server offers 16 GiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_larger_than_the_brokers_storage_is_refused_with_what_to_change() {
    let pg = TestCluster::start().await;
    let nats = NatsServer::start();
    let standin = Standin::start(MODEL, DIMS, CONTEXT, &[]);
    let ws = Workspace::new();
    let too_big: i64 = 64 << 30;
    let addr = ws.write_config(
        &standin.url(),
        MODEL,
        DIMS,
        &format!(
            "[database]\nurl = \"{}\"\n\n[nats]\nurl = \"{}\"\nstream = \"HUGE\"\nsubject = \"huge.conversations\"\nmax_bytes = {too_big}\n",
            pg.url(),
            nats.url()
        ),
    );
    let mut daemon = Daemon::spawn(&ws, &addr, &[]);
    let status = daemon.wait_exit(Duration::from_secs(60));
    assert!(!status.success());
    let log = daemon.log_text();
    assert!(
        log.contains("insufficient storage")
            && log.contains(&format!("nats.max_bytes = {too_big}")),
        "{log}"
    );
}

/// The scaling benchmark (docs/PERFORMANCE.md, "Shared intake"): stored
/// conversations per second with 1, 2 and 4 instances on one stream, with
/// the stand-in at an Ollama-like latency (embedding-bound) and at none
/// (database-bound), and the publish acknowledgement's p50/p99 at
/// `durable`. A benchmark, not a test: it asserts only that everything
/// acknowledged was stored. Run it on a quiet machine:
///
/// ```text
/// cargo test --release -p convstore --test shared_intake -- --ignored --nocapture bench_
/// ```
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run with --ignored on a quiet machine"]
async fn bench_stored_per_second_by_instances() {
    let total: usize = std::env::var("CONVSTORE_BENCH_CONVERSATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    println!(
        "| backend latency | backends | instances | stored/s | publish ack p50 | p99 | redelivered |"
    );
    println!("|---|---|---|---|---|---|---|");
    // Backend latency per request (ms): the first embedding-bound (each
    // instance keeps 2 requests of 32 texts in flight to the backend), the
    // second database- and CPU-bound.
    let latencies: Vec<String> = std::env::var("CONVSTORE_BENCH_LATENCIES_MS")
        .unwrap_or_else(|_| "300,0".into())
        .split(',')
        .map(str::to_string)
        .collect();
    for latency in latencies.iter().map(String::as_str) {
        for instances in [1usize, 2, 4] {
            let pg = TestCluster::start().await;
            let nats = NatsServer::start();
            // The stand-in computes one request at a time, as an Ollama
            // with OLLAMA_NUM_PARALLEL=1: embedding-bound, each instance has
            // its own (a machine with its own model server); database-
            // bound, they share one.
            let own_backends = latency != "0";
            let backends: Vec<Standin> = (0..if own_backends { instances } else { 1 })
                .map(|_| Standin::start(MODEL, DIMS, CONTEXT, &["--latency-ms", latency]))
                .collect();
            let mut running = Vec::new();
            for i in 0..instances {
                let standin = &backends[i % backends.len()];
                running.push(instance(standin, &pg.url(), &nats.url(), "").await);
            }
            let bases: Vec<String> = running.iter().map(|(_, d)| d.base_url()).collect();
            let http = reqwest::Client::new();
            let started = Instant::now();
            let mut latencies = Vec::with_capacity(total);
            let mut tasks = tokio::task::JoinSet::new();
            let queue = Arc::new(std::sync::Mutex::new(0..total));
            for worker in 0..16 {
                let (http, queue, bases) = (http.clone(), queue.clone(), bases.clone());
                tasks.spawn(async move {
                    let mut mine = Vec::new();
                    loop {
                        let Some(i) = queue.lock().unwrap().next() else {
                            break;
                        };
                        let t = Instant::now();
                        let resp = http
                            .post(format!(
                                "{}/v1/conversations?wait=durable",
                                bases[(i + worker) % bases.len()]
                            ))
                            .json(&conversation(i))
                            .send()
                            .await
                            .unwrap();
                        assert_eq!(resp.status(), 202);
                        mine.push(t.elapsed());
                    }
                    mine
                });
            }
            while let Some(mine) = tasks.join_next().await {
                latencies.extend(mine.unwrap());
            }
            let pool = connect_db(&pg.url()).await;
            let stored = wait_for_count(
                &pool,
                "SELECT count(*) FROM conversations",
                total as i64,
                Duration::from_secs(600),
            )
            .await;
            let elapsed = started.elapsed().as_secs_f64();
            assert_eq!(stored as usize, total);
            latencies.sort();
            let p = |q: f64| {
                latencies[((latencies.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1000.0
            };
            let mut redelivered = 0.0;
            for base in &bases {
                redelivered += metric_sum(base, "convstore_nats_messages_redelivered_total").await;
            }
            println!(
                "| {latency} ms | {} | {instances} | {:.0} | {:.2} ms | {:.2} ms | {redelivered} |",
                backends.len(),
                total as f64 / elapsed,
                p(0.5),
                p(0.99)
            );
        }
    }
}
