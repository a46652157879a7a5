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
