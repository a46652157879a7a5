//! The workspace's layering rules (ARCHITECTURE.md, "Rules"), checked
//! against `cargo metadata` so they cannot drift from the manifests, and
//! the crate graph ARCHITECTURE.md shows, checked against the real one.
// Test code: a panic on what the test set up itself is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// The repository root (this crate is `crates/daemon`).
const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// The order crates are listed in, top (leaves) to bottom.
const LAYERS: &[&str] = &[
    "convstore-core",
    "convstore-api",
    "convstore-telemetry",
    "convstore-dataset",
    "convstore-journal",
    "convstore-store",
    "convstore-nats",
    "convstore-embed",
    "convstore-embed-builtin",
    "convstore",
    "convstore-standin",
    "convstore-ack-floor",
];

/// What each product crate may depend on among the workspace's crates.
fn allowed() -> BTreeMap<&'static str, BTreeSet<&'static str>> {
    let leaves = ["convstore-core", "convstore-telemetry"];
    BTreeMap::from([
        ("convstore-core", BTreeSet::new()),
        ("convstore-api", BTreeSet::new()),
        ("convstore-telemetry", BTreeSet::from(["convstore-api"])),
        ("convstore-dataset", BTreeSet::from(leaves)),
        ("convstore-journal", BTreeSet::from(leaves)),
        ("convstore-store", BTreeSet::from(leaves)),
        ("convstore-nats", BTreeSet::from(leaves)),
        ("convstore-embed", BTreeSet::from(leaves)),
        (
            "convstore-embed-builtin",
            BTreeSet::from(["convstore-core", "convstore-telemetry", "convstore-embed"]),
        ),
        (
            "convstore",
            BTreeSet::from([
                "convstore-core",
                "convstore-api",
                "convstore-telemetry",
                "convstore-dataset",
                "convstore-journal",
                "convstore-store",
                "convstore-nats",
                "convstore-embed",
                "convstore-embed-builtin",
            ]),
        ),
    ])
}

struct Package {
    manifest: String,
    /// Normal (not dev, not build) dependencies, by name.
    normal: BTreeSet<String>,
}

fn workspace() -> BTreeMap<String, Package> {
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(REPO)
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");
    meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| {
            let normal = p["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .filter(|d| d["kind"].is_null())
                .map(|d| d["name"].as_str().expect("name").to_string())
                .collect();
            (
                p["name"].as_str().expect("name").to_string(),
                Package {
                    manifest: p["manifest_path"].as_str().expect("path").to_string(),
                    normal,
                },
            )
        })
        .collect()
}

fn is_tool(p: &Package) -> bool {
    p.manifest.contains("/tools/")
}

#[test]
fn every_crate_is_placed_in_a_layer() {
    let ws = workspace();
    let names: BTreeSet<&str> = ws.keys().map(String::as_str).collect();
    let listed: BTreeSet<&str> = LAYERS.iter().copied().collect();
    assert_eq!(
        names, listed,
        "a crate was added or removed: place it in LAYERS and allowed() here and in ARCHITECTURE.md"
    );
    let product = ws.values().filter(|p| !is_tool(p)).count();
    assert!(product >= 5, "{product} product crates");
}

#[test]
fn crates_use_only_the_layers_above_them() {
    let ws = workspace();
    let allowed = allowed();
    for (name, package) in &ws {
        let internal: BTreeSet<&str> = package
            .normal
            .iter()
            .map(String::as_str)
            .filter(|d| ws.contains_key(*d))
            .collect();
        if is_tool(package) {
            continue;
        }
        let may = allowed
            .get(name.as_str())
            .unwrap_or_else(|| panic!("{name} has no entry in allowed()"));
        let extra: Vec<&&str> = internal.difference(may).collect();
        assert!(
            extra.is_empty(),
            "{name} depends on {extra:?}, which ARCHITECTURE.md's layers do not allow"
        );
        for dep in &internal {
            assert!(
                !is_tool(&ws[*dep]),
                "product crate {name} depends on the tool {dep}: tools are not shipped"
            );
        }
    }
}

#[test]
fn one_crate_talks_sql_and_one_speaks_http() {
    let ws = workspace();
    let users = |dep: &str| -> Vec<&str> {
        ws.iter()
            .filter(|(_, p)| !is_tool(p) && p.normal.contains(dep))
            .map(|(n, _)| n.as_str())
            .collect()
    };
    assert_eq!(users("sqlx"), ["convstore-store"], "sqlx users");
    assert_eq!(users("axum"), ["convstore"], "axum users");
    assert_eq!(
        users("candle-core"),
        ["convstore-embed-builtin"],
        "candle users"
    );
    assert_eq!(
        users("openvino"),
        ["convstore-embed-builtin"],
        "OpenVINO users"
    );
}

#[test]
fn core_and_api_are_leaves_without_runtime_database_http_or_model() {
    let ws = workspace();
    let api = &ws["convstore-api"];
    assert_eq!(
        api.normal.iter().map(String::as_str).collect::<Vec<_>>(),
        ["serde"],
        "convstore-api holds plain serde types"
    );
    let core = &ws["convstore-core"];
    for forbidden in [
        "tokio",
        "sqlx",
        "axum",
        "reqwest",
        "hyper",
        "candle-core",
        "candle-nn",
        "candle-transformers",
        "openvino",
    ] {
        assert!(
            !core.normal.contains(forbidden),
            "convstore-core depends on {forbidden}"
        );
    }
    // The fuzz crate builds on core alone (its own workspace).
    let fuzz = std::fs::read_to_string(Path::new(REPO).join("fuzz/Cargo.toml")).unwrap();
    assert!(fuzz.contains("convstore-core = { path = \"../crates/core\" }"));
    assert!(!fuzz.contains("#[path"), "fuzz/Cargo.toml");
    let fuzz_lib = std::fs::read_to_string(Path::new(REPO).join("fuzz/src/lib.rs")).unwrap();
    assert!(
        !fuzz_lib.contains("#[path"),
        "fuzz/src/lib.rs mounts source files"
    );
}

/// The block between the markers in ARCHITECTURE.md.
fn render_graph(ws: &BTreeMap<String, Package>) -> String {
    let width = LAYERS.iter().map(|n| n.len()).max().unwrap_or(0);
    let mut out = String::from("```\n");
    for name in LAYERS {
        let package = &ws[*name];
        let internal: Vec<&str> = package
            .normal
            .iter()
            .map(String::as_str)
            .filter(|d| ws.contains_key(*d))
            .collect();
        let deps = if internal.is_empty() {
            "(no workspace dependencies)".to_string()
        } else {
            format!("-> {}", internal.join(", "))
        };
        out.push_str(&format!("{name:width$} {deps}\n"));
    }
    out.push_str("```\n");
    out
}

#[test]
fn architecture_md_shows_the_real_crate_graph() {
    let ws = workspace();
    let doc = std::fs::read_to_string(Path::new(REPO).join("ARCHITECTURE.md")).unwrap();
    let begin = "<!-- crate-graph:begin -->\n";
    let end = "<!-- crate-graph:end -->";
    let start = doc.find(begin).expect("begin marker") + begin.len();
    let stop = doc.find(end).expect("end marker");
    let expected = render_graph(&ws);
    assert_eq!(
        &doc[start..stop],
        expected,
        "ARCHITECTURE.md's crate graph is stale; paste this between the markers:\n{expected}"
    );
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// No metric call in product code spells a label key: keys come from
/// `convstore_telemetry::events::label`, so `/v1/stats` (which matches
/// them) and the dashboards cannot drift from what is recorded. Test
/// modules may spell them, to check the constants against the docs.
#[test]
fn metric_label_keys_are_named_once() {
    let key = regex_lite_label_key();
    let mut offenders = Vec::new();
    let mut files = Vec::new();
    for dir in ["crates", "tools"] {
        rust_files(&Path::new(REPO).join(dir), &mut files);
    }
    for path in files {
        if path.components().any(|c| c.as_os_str() == "tests") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let product = text.split("#[cfg(test)]").next().unwrap_or("");
        let mut in_metric_call = 0usize;
        for (n, line) in product.lines().enumerate() {
            if ["counter!(", "gauge!(", "histogram!("]
                .iter()
                .any(|m| line.contains(m))
            {
                in_metric_call = 4;
            }
            if in_metric_call > 0 {
                if key(line) {
                    offenders.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                }
                in_metric_call -= 1;
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "label keys spelled out in metric calls (use convstore_telemetry::events::label):\n{}",
        offenders.join("\n")
    );
}

/// Whether `line` holds `"word" =>`: a label key written as a literal.
fn regex_lite_label_key() -> impl Fn(&str) -> bool {
    |line: &str| {
        line.match_indices("\" =>").any(|(end, _)| {
            let before = &line[..end];
            before.rfind('"').is_some_and(|start| {
                let word = &before[start + 1..];
                !word.is_empty() && word.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            })
        })
    }
}
