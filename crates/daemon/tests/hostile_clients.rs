//! Hostile clients against the real daemon (issue 15): ids chosen to alias
//! another conversation's row, connections that never finish their headers
//! (slowloris), floods of idle keep-alive connections, and bodies that
//! never end. Each attack is bounded in count and time, on loopback.
// Test code: a panic on what the test set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use support::daemon::{Daemon, Standin, Workspace, connect_db};
use uuid::Uuid;

const MODEL: &str = "hostile-embed";
const DIMS: usize = 16;

/// The namespace row ids were derived under when the aliasing was reported:
/// `uuid5(NS, id)` for an id that is not a UUID, the UUID itself otherwise.
const REPORTED_NAMESPACE: Uuid = Uuid::from_u128(0x6a1f_0c3e_5b7d_4e21_9c8a_2f4d_1e0b_7c55);

/// Every spelling of `uuid` that parses as it.
fn spellings(uuid: Uuid) -> Vec<String> {
    vec![
        uuid.to_string(),
        uuid.to_string().to_uppercase(),
        format!("{{{uuid}}}"),
        format!("urn:uuid:{uuid}"),
        uuid.simple().to_string(),
    ]
}

async fn post_stored(client: &reqwest::Client, base: &str, body: Value) -> (u16, Value) {
    let resp = client
        .post(format!("{base}/v1/conversations?wait=stored"))
        .json(&body)
        .send()
        .await
        .expect("post");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn get(client: &reqwest::Client, base: &str, id: &str) -> (u16, Value) {
    let resp = client
        .get(format!("{base}/v1/conversations/{}", urlencode(id)))
        .send()
        .await
        .expect("get");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn urlencode(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The attack of the report: the attacker posts, in every spelling, the
/// UUID the victim's id maps to; then the victim posts. The victim's
/// `201 stored` must mean its row exists, readable by its id, and every
/// attacker's post keeps its own row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_aliasing_another_conversations_row_is_never_answered_stored_without_the_row() {
    let standin = Standin::start(MODEL, DIMS, 512, &[]);
    let ws = Workspace::new();
    let addr = ws.write_config(&standin.url(), MODEL, DIMS, "");
    let daemon = Daemon::start(&ws, &addr).await;
    let base = daemon.base_url();
    let client = reqwest::Client::new();

    let victim = "victim-conversation-42";
    let reported = Uuid::new_v5(&REPORTED_NAMESPACE, victim.as_bytes());
    let today = convstore_core::validate::row_id(victim);
    let mut attacker_ids = spellings(reported);
    attacker_ids.extend(spellings(today));
    attacker_ids.sort();
    attacker_ids.dedup();
    for id in &attacker_ids {
        let body = json!({"id": id, "user_id": "mallory", "channel": "web",
                          "transcript": format!("planted under {id}")});
        let (status, answer) = post_stored(&client, &base, body).await;
        assert_eq!(status, 201, "attacker post {id}: {answer}");
    }

    let body = json!({"id": victim, "user_id": "alice", "channel": "web",
                      "transcript": "the victim's own words"});
    let (status, answer) = post_stored(&client, &base, body).await;
    assert_eq!(status, 201, "victim post: {answer}");
    assert_eq!(answer["id"], victim, "{answer}");

    let (status, found) = get(&client, &base, victim).await;
    assert_eq!(status, 200, "GET victim after 201 stored: {found}");
    assert_eq!(found["transcript"], "the victim's own words", "{found}");
    assert_eq!(found["user_id"], "alice", "{found}");
    for id in &attacker_ids {
        let (status, found) = get(&client, &base, id).await;
        assert_eq!(status, 200, "GET {id}: {found}");
        assert_eq!(
            found["transcript"],
            format!("planted under {id}"),
            "{found}"
        );
    }

    let pool = connect_db(&ws.database_url()).await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM conversations")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(rows as usize, attacker_ids.len() + 1);
    let victims: i64 =
        sqlx::query_scalar("SELECT count(*) FROM conversations WHERE client_id = $1")
            .bind(victim)
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!(victims, 1);
}

/// Resident memory of `pid`, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// Descriptors `pid` holds open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("proc fd")
        .count()
}

/// Raises this process's soft descriptor limit to the hard one (the test
/// itself holds the attackers' ends); returns it.
fn raise_own_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
    limit.rlim_cur
}

/// The daemon's `/metrics`, over its Unix socket (not the flooded port).
async fn scrape(daemon: &Daemon) -> support::exposition::Scrape {
    let response = daemon
        .unix_client()
        .get("/metrics")
        .await
        .expect("scrape /metrics");
    support::exposition::Scrape::parse(&String::from_utf8_lossy(&response.body))
        .expect("exposition parses")
}

/// Opens `count` TCP connections to `addr`, `concurrency` at a time; those
/// the server refuses or closes at once are simply not held.
async fn connect_many(
    addr: &str,
    count: usize,
    prefix: &'static [u8],
) -> Vec<tokio::net::TcpStream> {
    use futures::StreamExt as _;
    use tokio::io::AsyncWriteExt as _;
    futures::stream::iter(0..count)
        .map(|_| async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
            if !prefix.is_empty() {
                stream.write_all(prefix).await.ok()?;
            }
            Some(stream)
        })
        .buffer_unordered(128)
        .filter_map(|s| async move { s })
        .collect()
        .await
}

fn conversation(n: usize) -> Value {
    json!({"user_id": "bob", "channel": "web",
           "messages": [{"role": "user", "content": format!("hello number {n}")}]})
}

/// 10,000 idle connections and 2,000 slowloris heads against the defaults
/// (4,096 connections per listener): the daemon holds at most its limit,
/// a normal client still gets its 202, memory stays bounded, and every
/// attacker's connection is closed once the idle timeout passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slowloris_floods_are_bounded_and_a_normal_client_is_served() {
    const IDLE: usize = 10_000;
    const SLOWLORIS: usize = 2_000;
    const MAX_CONNECTIONS: usize = 4_096;
    let limit = raise_own_fd_limit();
    assert!(
        limit >= (IDLE + SLOWLORIS + 1_000) as u64,
        "this test holds {} connections and needs `ulimit -Hn` above that; it is {limit}",
        IDLE + SLOWLORIS
    );
    let standin = Standin::start(MODEL, DIMS, 512, &[]);
    let ws = Workspace::new();
    let addr = ws.write_config(&standin.url(), MODEL, DIMS, "");
    let daemon = Daemon::start_with_env(
        &ws,
        &addr,
        &[
            ("CONVSTORE_SERVER__HEADER_TIMEOUT_MS", "5000"),
            ("CONVSTORE_SERVER__IDLE_TIMEOUT_MS", "5000"),
        ],
    )
    .await;
    let pid = daemon.pid();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let (status, _) = post_stored(&client, &daemon.base_url(), conversation(0)).await;
    assert_eq!(status, 201);
    let (rss_before, fds_before) = (rss_bytes(pid), open_fds(pid));

    let idle = connect_many(&addr, IDLE, b"").await;
    let slow = connect_many(
        &addr,
        SLOWLORIS,
        b"POST /v1/conversations HTTP/1.1\r\nHost: x\r\nX-Slow: ",
    )
    .await;
    let (rss_flooded, fds_flooded) = (rss_bytes(pid), open_fds(pid));

    let started = std::time::Instant::now();
    let answer = client
        .post(format!("{}/v1/conversations", daemon.base_url()))
        .json(&conversation(1))
        .timeout(std::time::Duration::from_secs(10))
        .send()
        .await
        .expect("a normal client's post during the flood");
    let took = started.elapsed();
    let served = answer.status().as_u16();
    println!(
        "attack: {} idle + {} slowloris connections made; daemon fds {fds_before} -> {fds_flooded}, \
         RSS {} -> {} MiB; a normal post answered {served} in {took:?}",
        idle.len(),
        slow.len(),
        rss_before >> 20,
        rss_flooded >> 20,
    );
    assert_eq!(served, 202, "a normal client during the flood");
    assert!(
        fds_flooded <= fds_before + MAX_CONNECTIONS + 64,
        "the daemon holds {fds_flooded} descriptors: more than its {MAX_CONNECTIONS} connections allow"
    );
    assert!(
        rss_flooded < rss_before + (256 << 20),
        "RSS grew from {} to {} MiB under the flood",
        rss_before >> 20,
        rss_flooded >> 20
    );

    // Every connection without a request is closed once the idle timeout
    // (5 s here) passes; none stays held.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let open = loop {
        let scrape = scrape(&daemon).await;
        let open = scrape.value("convstore_http_connections", &[("transport", "tcp")]);
        if open < 1.0 || std::time::Instant::now() > deadline {
            break (open, scrape);
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    let (open, scrape) = open;
    let closed = |reason| {
        scrape.value(
            "convstore_http_connections_closed_total",
            &[("transport", "tcp"), ("reason", reason)],
        )
    };
    // Memory freed by the closed connections goes back to the system
    // (glibc keeps freed heap otherwise; convstore trims it).
    tokio::time::sleep(std::time::Duration::from_secs(12)).await;
    let rss_after = rss_bytes(pid);
    println!(
        "after the idle timeout: {open} TCP connections open; closed idle {}, header_timeout {}, evicted {}, shed {}; \
         daemon fds {}, RSS {} MiB (was {} MiB before the attack, {} MiB under it)",
        closed("idle"),
        closed("header_timeout"),
        closed("evicted"),
        closed("shed"),
        open_fds(pid),
        rss_after >> 20,
        rss_before >> 20,
        rss_flooded >> 20
    );
    assert_eq!(
        open, 0.0,
        "attack connections still held after the idle timeout"
    );
    assert!(
        closed("evicted") > 0.0,
        "at the limit, new connections replace unused ones"
    );
    assert!(closed("idle") > 0.0);
    assert!(closed("header_timeout") > 0.0, "slowloris heads time out");
    assert!(open_fds(pid) <= fds_before + 16);
    assert!(
        rss_after < rss_before + (24 << 20),
        "RSS stayed at {} MiB after the attack ended (from {} MiB): freed memory not returned",
        rss_after >> 20,
        rss_before >> 20
    );
    drop((idle, slow));
}

/// 800 bodies that stop arriving after 256 KiB each: the daemon holds at
/// most `server.max_buffered_body_bytes` of them, answers every one (503
/// `bodies_full` at once, or 408 `body_timeout` when its time is up) and
/// serves a normal client afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_are_bounded_in_memory_and_time() {
    use futures::StreamExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const STALLED: usize = 800;
    const CHUNK: usize = 256 * 1024;
    const BUDGET: u64 = 16 << 20;
    raise_own_fd_limit();
    let standin = Standin::start(MODEL, DIMS, 512, &[]);
    let ws = Workspace::new();
    let addr = ws.write_config(&standin.url(), MODEL, DIMS, "");
    let budget = BUDGET.to_string();
    let daemon = Daemon::start_with_env(
        &ws,
        &addr,
        &[
            ("CONVSTORE_SERVER__BODY_TIMEOUT_MS", "3000"),
            ("CONVSTORE_SERVER__MAX_BUFFERED_BODY_BYTES", budget.as_str()),
        ],
    )
    .await;
    let pid = daemon.pid();
    let rss_before = rss_bytes(pid);

    let mut request = format!(
        "POST /v1/conversations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n{CHUNK:x}\r\n"
    )
    .into_bytes();
    request.extend(std::iter::once(b'[').chain(std::iter::repeat_n(b' ', CHUNK - 1)));
    request.extend_from_slice(b"\r\n");
    let request: &'static [u8] = Box::leak(request.into_boxed_slice());

    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(rss_before));
    let sampling = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_bytes(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        })
    };
    // Some(status) answered; Some(0) closed by the server (a close with
    // our unread bytes in its buffer is a reset, which can overtake the
    // answer); None still held after a minute.
    let answers: Vec<Option<u16>> = futures::stream::iter(0..STALLED)
        .map(|_| {
            let addr = addr.clone();
            async move {
                let mut stream = tokio::net::TcpStream::connect(&addr).await.ok()?;
                // The server may answer and close before all is sent.
                let _ = stream.write_all(request).await;
                let mut head = vec![0u8; 64];
                let read = tokio::time::timeout(
                    std::time::Duration::from_secs(60),
                    stream.read(&mut head),
                )
                .await
                .ok()?;
                let Ok(read) = read else {
                    return Some(0);
                };
                let text = String::from_utf8_lossy(&head[..read]).to_string();
                Some(
                    text.split(' ')
                        .nth(1)
                        .and_then(|c| c.parse::<u16>().ok())
                        .unwrap_or(0),
                )
            }
        })
        .buffer_unordered(STALLED)
        .collect()
        .await;
    sampling.abort();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    let count = |code| answers.iter().filter(|a| **a == Some(code)).count();
    let held = answers.iter().filter(|a| a.is_none()).count();
    println!(
        "{STALLED} stalled bodies: {} answered 503, {} answered 408, {} closed by the server \
         before its answer arrived, {held} still held; RSS {} MiB before, peak {} MiB (budget {} MiB)",
        count(503),
        count(408),
        count(0),
        rss_before >> 20,
        peak >> 20,
        BUDGET >> 20
    );
    assert_eq!(held, 0, "no stalled body is held");
    assert_eq!(count(503) + count(408) + count(0), STALLED, "{answers:?}");
    // A refusal leaves the rest of the body unsent. Closing on it unread is
    // a reset, and 99 of 800 answers were lost on a loaded CI machine
    // (none on a quiet one). The daemon now lingers (reads and discards
    // what still comes, `http::serve`), which removes that reset; but the
    // CI losses were never reproduced elsewhere, so the reset is not proven
    // their only cause, and a client descheduled for longer than the daemon
    // lingers can still meet one. The bound stays a quarter: a server that
    // mostly resets instead of answering still fails here.
    assert!(count(0) <= STALLED / 4, "most refusals arrive as answers");
    assert!(count(408) > 0, "bodies within the budget time out");
    // Beyond the budget: 800 connections' own buffers, and what the
    // allocator keeps of freed ones for reuse. jemalloc (the daemon's
    // allocator) keeps freed pages up to 10 s, so its peak here is 62–77 MiB
    // over the start against glibc's 46–58 MiB; with the budget ignored the
    // 800 bodies alone would hold 200 MiB.
    assert!(
        peak < rss_before + BUDGET + (96 << 20),
        "RSS peaked at {} MiB from {} MiB with a {} MiB body budget",
        peak >> 20,
        rss_before >> 20,
        BUDGET >> 20
    );

    let scrape = scrape(&daemon).await;
    assert_eq!(scrape.value("convstore_http_body_buffered_bytes", &[]), 0.0);
    let client = reqwest::Client::new();
    let (status, answer) = post_stored(&client, &daemon.base_url(), conversation(2)).await;
    assert_eq!(status, 201, "{answer}");
}

/// A client that writes its whole request before reading (as Python's
/// `http.client`, so `requests`, does) and whose body is refused before it
/// is read. Returns whether the whole body was written, and the answer's
/// head and body (empty when the connection was reset before it).
fn post_whole_then_read<S: std::io::Read + std::io::Write>(
    mut stream: S,
    body_len: usize,
) -> (bool, String) {
    let head = format!(
        "POST /v1/conversations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {body_len}\r\n\r\n"
    );
    let body = vec![b' '; body_len];
    let written = stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(&body))
        .is_ok();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    (written, String::from_utf8_lossy(&answer).to_string())
}

/// The client keeps sending after its answer, forever: the daemon reads and
/// discards only so much, for only so long, then closes. Returns how long
/// the client could keep writing.
fn send_forever_after_the_answer<S: std::io::Write>(mut stream: S) -> std::time::Duration {
    let started = std::time::Instant::now();
    let head = "POST /v1/conversations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                Content-Length: 999999999999\r\n\r\n";
    let chunk = vec![b' '; 64 * 1024];
    let _ = stream.write_all(head.as_bytes());
    while started.elapsed() < std::time::Duration::from_secs(120) {
        if stream.write_all(&chunk).is_err() {
            break;
        }
    }
    started.elapsed()
}

/// A body refused before it is read whole (here 413: over
/// `server.max_body_bytes`) leaves the client still sending. Closing with
/// its bytes unread would reset the connection: the client's write fails
/// and the answer that says what is wrong is lost. The daemon lingers
/// instead: it answers, reads and discards the rest, then closes. Over TCP
/// and the Unix socket; a client that never stops sending is still closed
/// on; and a connection shed at `server.max_connections` gets its 503 the
/// same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_body_is_answered_not_reset_while_the_client_still_sends() {
    const MAX_CONNECTIONS: usize = 4;
    let standin = Standin::start(MODEL, DIMS, 512, &[]);
    let ws = Workspace::new();
    let addr = ws.write_config(&standin.url(), MODEL, DIMS, "");
    let max_connections = MAX_CONNECTIONS.to_string();
    let daemon = Daemon::start_with_env(
        &ws,
        &addr,
        &[(
            "CONVSTORE_SERVER__MAX_CONNECTIONS",
            max_connections.as_str(),
        )],
    )
    .await;
    let socket = ws.socket();
    // 8 MiB, against the default limit of 1 MiB: far more than the
    // kernel's socket buffers take before the daemon has answered.
    const BODY: usize = 8 << 20;

    let tcp_addr = addr.clone();
    let unix_path = socket.clone();
    let (tcp, unix) = tokio::task::spawn_blocking(move || {
        let timeout = Some(std::time::Duration::from_secs(30));
        let tcp = std::net::TcpStream::connect(&tcp_addr).unwrap();
        tcp.set_read_timeout(timeout).unwrap();
        tcp.set_write_timeout(timeout).unwrap();
        let unix = std::os::unix::net::UnixStream::connect(&unix_path).unwrap();
        unix.set_read_timeout(timeout).unwrap();
        unix.set_write_timeout(timeout).unwrap();
        (
            post_whole_then_read(tcp, BODY),
            post_whole_then_read(unix, BODY),
        )
    })
    .await
    .unwrap();
    for (transport, (written, answer)) in [("tcp", tcp), ("unix", unix)] {
        assert!(
            written,
            "{transport}: the body could not be sent whole (reset); answer {answer:?}"
        );
        assert!(
            answer.starts_with("HTTP/1.1 413 "),
            "{transport}: {answer:?}"
        );
        assert!(
            answer.contains("payload_too_large"),
            "{transport}: {answer:?}"
        );
    }

    let tcp_addr = addr.clone();
    let unix_path = socket.clone();
    let (tcp_for, unix_for) = tokio::task::spawn_blocking(move || {
        let tcp = std::net::TcpStream::connect(&tcp_addr).unwrap();
        let unix = std::os::unix::net::UnixStream::connect(&unix_path).unwrap();
        (
            send_forever_after_the_answer(tcp),
            send_forever_after_the_answer(unix),
        )
    })
    .await
    .unwrap();
    // The daemon stops reading after 2 s or 64 MiB; a minute is only a
    // bound that a daemon which never closes would break.
    for (transport, sent_for) in [("tcp", tcp_for), ("unix", unix_for)] {
        assert!(
            sent_for < std::time::Duration::from_secs(60),
            "{transport}: the daemon took what the client sent for {sent_for:?}"
        );
    }

    // Every TCP slot serving a request whose body is slow to come: the
    // next connection is shed, and its whole request is taken in first.
    let serving = connect_many(
        &addr,
        MAX_CONNECTIONS,
        b"POST /v1/conversations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 1000\r\n\r\n{",
    )
    .await;
    assert_eq!(serving.len(), MAX_CONNECTIONS);
    // Serving once their handlers read the first byte of each body.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while scrape(&daemon)
        .await
        .value("convstore_http_body_buffered_bytes", &[])
        < MAX_CONNECTIONS as f64
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the slow bodies never started being read"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let tcp_addr = addr.clone();
    let (written, answer) = tokio::task::spawn_blocking(move || {
        let tcp = std::net::TcpStream::connect(&tcp_addr).unwrap();
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        tcp.set_write_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        post_whole_then_read(tcp, BODY)
    })
    .await
    .unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 503 "),
        "a connection over the limit: {answer:?}"
    );
    assert!(answer.contains("too_many_connections"), "{answer:?}");
    assert!(written, "the shed request could not be sent whole (reset)");
    drop(serving);
    // The slots are freed once the daemon has seen those clients close,
    // which takes it a moment: a request sent before that is rightly shed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while scrape(&daemon)
        .await
        .value("convstore_http_connections", &[("transport", "tcp")])
        >= 1.0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the closed slow-body connections were never released"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // And it still serves.
    let client = reqwest::Client::new();
    let (status, answer) = post_stored(&client, &daemon.base_url(), conversation(3)).await;
    assert_eq!(status, 201, "{answer}");
}
