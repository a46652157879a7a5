//! What the storage benchmarks share: deterministic conversations with
//! embedded chunks (uniform or clustered vectors), a meter of server and
//! client CPU time, and concurrent writers through `Store::write_batch`.
//!
//! Include it with `#[path = "support/rows.rs"] mod rows;` (it needs the
//! `cluster` module of `tests/support/cluster.rs` declared beside it).
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use convstore_core::model::{
    Chunk, ChunkVector, Conversation, EmbeddedChunk, Message, ReadyConversation, Role, content_hash,
};
use convstore_store::Store;
use uuid::Uuid;

use super::cluster;

/// splitmix64: deterministic, dependency-free.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }

    /// Roughly normal, mean 0, variance 1 (Irwin–Hall of four uniforms).
    pub fn normal(&mut self) -> f32 {
        (self.unit() + self.unit() + self.unit() + self.unit()) * 0.866
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

pub fn normalised(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::MIN_POSITIVE);
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

/// How the chunk vectors are spread over the sphere.
pub enum Vectors {
    /// Independent uniform directions: every pair nearly orthogonal, the
    /// hardest case for an HNSW graph and unlike any embedding model.
    Uniform,
    /// Topic → subtopic → text, as sentence embeddings cluster: a text's
    /// nearest neighbours share its subtopic (cosine ≈ 0.8), its topic
    /// (≈ 0.45), and unrelated texts are near orthogonal.
    Clustered { subtopics: Vec<Vec<f32>> },
}

impl Vectors {
    /// `topics` × `per_topic` subtopics of `dims` dimensions.
    pub fn clustered(rng: &mut Rng, dims: usize, topics: usize, per_topic: usize) -> Vectors {
        let mut subtopics = Vec::with_capacity(topics * per_topic);
        for _ in 0..topics {
            let topic = normalised((0..dims).map(|_| rng.normal()).collect());
            for _ in 0..per_topic {
                subtopics.push(jitter(rng, &topic, 1.0));
            }
        }
        Vectors::Clustered { subtopics }
    }

    pub fn next(&self, rng: &mut Rng, dims: usize) -> Vec<f32> {
        match self {
            Vectors::Uniform => normalised((0..dims).map(|_| rng.unit()).collect()),
            Vectors::Clustered { subtopics } => {
                let centre = &subtopics[rng.below(subtopics.len())];
                jitter(rng, centre, 0.5)
            }
        }
    }
}

/// `centre` plus isotropic noise of norm about `radius`, normalised.
fn jitter(rng: &mut Rng, centre: &[f32], radius: f32) -> Vec<f32> {
    let scale = radius / (centre.len() as f32).sqrt();
    normalised(centre.iter().map(|c| c + rng.normal() * scale).collect())
}

/// Conversations of `chunks` chunks of ~1.5 KB of text each (a chunk of a
/// chat), with their vectors.
pub struct Generator {
    pub rng: Rng,
    pub next_id: u128,
    pub dims: usize,
    pub chunks: usize,
    pub vectors: Vectors,
}

impl Generator {
    pub fn new(seed: u64, dims: usize, chunks: usize, vectors: Vectors) -> Generator {
        Generator {
            rng: Rng(seed),
            next_id: 0,
            dims,
            chunks,
            vectors,
        }
    }

    pub fn batch(&mut self, conversations: usize) -> Vec<ReadyConversation> {
        (0..conversations).map(|_| self.conversation()).collect()
    }

    /// A vector from the chunks' distribution that no chunk has (a query).
    pub fn query_vector(&mut self) -> Vec<f32> {
        self.vectors.next(&mut self.rng, self.dims)
    }

    pub fn conversation(&mut self) -> ReadyConversation {
        self.next_id += 1;
        let id = Uuid::from_u128(self.next_id);
        let words = [
            "flight", "Seattle", "refund", "order", "password", "weather", "invoice", "meeting",
            "delivery", "account", "please", "thanks", "tomorrow", "booking", "support",
        ];
        let chunks = (0..self.chunks)
            .map(|seq| {
                let mut text = format!("user: conversation {id} part {seq}\n");
                while text.len() < 1500 {
                    text.push_str(words[self.rng.below(words.len())]);
                    text.push(' ');
                }
                let v = self.vectors.next(&mut self.rng, self.dims);
                EmbeddedChunk {
                    chunk: Chunk {
                        seq: seq as i32,
                        content_hash: content_hash(&text),
                        content: text,
                    },
                    vector: ChunkVector::Embedded(Arc::from(v)),
                }
            })
            .collect::<Vec<_>>();
        let transcript = chunks
            .iter()
            .map(|c| c.chunk.content.as_str())
            .collect::<String>();
        ReadyConversation {
            conversation: Conversation {
                id,
                client_id: Some(format!("bench-{}", self.next_id)),
                user_id: format!("user-{}", self.next_id % 100),
                channel: "bench".into(),
                messages: vec![Message {
                    role: Role::User,
                    content: transcript,
                    ts: None,
                    message_id: None,
                }],
                transcript: None,
                summary: None,
                metadata: serde_json::json!({"source": "bench"}),
                created_at: None,
                received_at: Utc::now(),
                received_instant: Instant::now(),
            },
            chunks,
            model: "bench-model".into(),
            version: convstore_core::model::RowVersion::default(),
        }
    }
}

/// Sums utime + stime of processes from /proc (Linux), in clock ticks.
pub struct CpuMeter {
    server_data_dir: Option<std::path::PathBuf>,
    tick: Duration,
}

impl CpuMeter {
    pub fn new(server_data_dir: Option<std::path::PathBuf>) -> Self {
        let hz = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .filter(|hz| *hz > 0)
            .unwrap_or(100);
        Self {
            server_data_dir,
            tick: Duration::from_secs(1) / hz as u32,
        }
    }

    /// (server, client) CPU time so far.
    pub fn sample(&self) -> (Duration, Duration) {
        let server = self.server_data_dir.as_ref().map_or(0, |dir| {
            cluster::postgres_processes_in(dir)
                .into_iter()
                .map(|pid| ticks(&format!("/proc/{pid}/stat")))
                .sum()
        });
        let client = ticks("/proc/self/stat");
        (self.tick * server as u32, self.tick * client as u32)
    }
}

fn ticks(stat_path: &str) -> u64 {
    let Ok(text) = std::fs::read_to_string(stat_path) else {
        return 0;
    };
    // Fields after the parenthesised command name; utime and stime are
    // fields 14 and 15 of the whole line.
    let Some(rest) = text.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(11) + get(12)
}

/// Writes `batches` pre-built batches with `writers` concurrent tasks;
/// returns chunk rows written and wall time.
pub async fn write_all(
    store: &Store,
    batches: Vec<Vec<ReadyConversation>>,
    writers: usize,
) -> (usize, Duration) {
    let started = Instant::now();
    let queue = Arc::new(std::sync::Mutex::new(batches));
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let store = store.clone();
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut rows = 0;
            loop {
                let next = queue.lock().map(|mut q| q.pop()).unwrap_or(None);
                let Some(batch) = next else { break };
                let outcome = store.write_batch(&batch).await.expect("write batch");
                assert_eq!(outcome.duplicates, 0);
                rows += outcome.chunks_inserted;
            }
            rows
        }));
    }
    let mut rows = 0;
    for task in tasks {
        rows += task.await.expect("writer task");
    }
    (rows, started.elapsed())
}

/// `base_url` with its database replaced by `name`.
pub fn with_database(base_url: &str, name: &str) -> String {
    let (before_query, query) = match base_url.split_once('?') {
        Some((a, q)) => (a, format!("?{q}")),
        None => (base_url, String::new()),
    };
    let authority_end = before_query
        .find("://")
        .map(|i| i + 3)
        .and_then(|start| before_query[start..].find('/').map(|j| start + j))
        .unwrap_or(before_query.len());
    format!("{}/{name}{query}", &before_query[..authority_end])
}
