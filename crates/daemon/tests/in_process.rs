//! The daemon in this test process (`convstore::app::run`), on listeners
//! the test bound on port 0 and a Unix socket in a temp directory, with its
//! managed PostgreSQL and the stand-in embedder: the way in for tests that
//! need the real daemon over real sockets but not a process of its own
//! (ARCHITECTURE.md, "Tests"). Shutdown is a future the test resolves.
// Test code: a panic on what the test set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use convstore::app::{ExitStatus, Listeners};
use convstore::cli::client::{Client, Endpoint};
use convstore::config::Settings;
use serde_json::{Value, json};
use support::cluster::{require_setup, traversable_tempdir};
use support::daemon::{Standin, connect_db, wait_for_count};

const MODEL: &str = "in-process-embed";
const DIMS: usize = 16;

fn settings(state_dir: &std::path::Path, standin_url: &str) -> Settings {
    let toml = format!(
        r#"state_dir = "{state}"

[server]
http_addr = ""
unix_socket = ""

[database]
managed_shared_buffers = "16MB"

[embedding]
model = "{MODEL}"
dimensions = {DIMS}

[[embedding.backends]]
name = "standin"
kind = "ollama"
url = "{standin_url}"

[shutdown]
timeout_ms = 30000
"#,
        state = state_dir.display(),
    );
    toml::from_str(&toml).expect("test settings")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_over_tcp_and_unix_and_drains_on_shutdown() {
    require_setup();
    let standin = Standin::start(MODEL, DIMS, 512, &[]);
    let dir = traversable_tempdir();
    let settings = settings(&dir.path().join("state"), &standin.url());
    let database_url = format!(
        "postgres://convstore@localhost/convstore?host={}",
        dir.path().join("state/postgres/run").display()
    );

    // Bound here, before the daemon exists: port 0, no race for it.
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", tcp.local_addr().unwrap());
    let socket = dir.path().join("api.sock");
    let unix = tokio::net::UnixListener::bind(&socket).unwrap();
    let listeners = Listeners {
        tcp: vec![tcp],
        unix: vec![unix],
        ..Listeners::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(convstore::app::run(settings, listeners, async {
        let _ = stopped.await;
    }));

    // Ready once start-up is over (the managed cluster's initdb first).
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        assert!(!daemon.is_finished(), "the daemon ended during start-up");
        if let Ok(resp) = http.get(format!("{base}/readyz")).send().await
            && resp.status() == 200
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not ready in 120 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Over TCP, waiting until the row is committed.
    let resp = http
        .post(format!("{base}/v1/conversations?wait=stored"))
        .json(&json!({
            "id": "in-process-tcp",
            "user_id": "u-1",
            "channel": "web",
            "messages": [{"role": "user", "content": "book a table for two in Lisbon"}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], "stored");

    // Over the Unix socket, acknowledged as queued.
    let mut client = Client::new(Endpoint::Unix(socket.clone()));
    let body = json!({
        "id": "in-process-unix",
        "user_id": "u-2",
        "channel": "cli",
        "messages": [{"role": "user", "content": "what is the weather in Porto"}]
    });
    let answer = client
        .post_json(
            "/v1/conversations",
            "application/json",
            serde_json::to_vec(&body).unwrap().into(),
        )
        .await
        .unwrap();
    assert_eq!(
        answer.status,
        202,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );

    // Shutdown drains what was accepted before the daemon returns.
    stop.send(()).unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(60), daemon)
        .await
        .expect("stopped within 60 s")
        .expect("the daemon task")
        .expect("the daemon");
    assert_eq!(exit, ExitStatus::Clean);
    assert!(
        http.get(format!("{base}/healthz")).send().await.is_err(),
        "the listener is closed after shutdown"
    );

    // Both rows are there, each with the stand-in's vector for its text.
    // The daemon stopped its managed cluster; start it again to look.
    let cluster = convstore_store::managed::ManagedCluster::start(
        &self::settings(&dir.path().join("state"), &standin.url()).managed_cluster(),
    )
    .await
    .unwrap();
    let db = connect_db(&database_url).await;
    assert_eq!(
        wait_for_count(
            &db,
            "SELECT count(*) FROM conversations WHERE client_id LIKE 'in-process-%'",
            2,
            Duration::from_secs(5),
        )
        .await,
        2
    );
    let vectors: Vec<(String, String)> =
        sqlx::query_as("SELECT content, embedding::text FROM conversation_chunks ORDER BY content")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(vectors.len(), 2);
    for (content, vector) in vectors {
        let got: Vec<f32> = vector
            .trim_matches(|c| c == '[' || c == ']')
            .split(',')
            .map(|x| x.parse().unwrap())
            .collect();
        let want = convstore_standin::standin_vector(&content, DIMS);
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{content}: {got:?} vs {want:?}");
        }
    }
    db.close().await;
    cluster.stop().await.unwrap();
}
