//! `convstore status`: `/v1/stats` of a running daemon as a terminal view
//! readable at a glance, once or refreshed (`--watch`), or the raw JSON
//! (`--json`).

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};

use super::client::{Client, Endpoint};
use crate::config::Settings;
use convstore_api::stats::{Stage, StageLatency, StatsSnapshot, Verdict};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Unix socket of the daemon (default: server.unix_socket from the config).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// HTTP base URL instead of the socket, e.g. http://127.0.0.1:7070.
    #[arg(long)]
    pub url: Option<String>,
    /// Redraw every --interval seconds until interrupted (Ctrl-C).
    #[arg(long, short)]
    pub watch: bool,
    /// Seconds between redraws with --watch.
    #[arg(long, short = 'n', default_value_t = 2.0, value_parser = parse_interval)]
    pub interval: f64,
    /// Print the /v1/stats JSON once and exit.
    #[arg(long, conflicts_with = "watch")]
    pub json: bool,
    /// No colours (also when NO_COLOR is set or output is not a terminal).
    #[arg(long)]
    pub no_color: bool,
}

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "`{s}` is not a number of seconds between 0.1 and 3600"
        )),
    }
}

pub async fn run(args: StatusArgs, settings: &Settings) -> anyhow::Result<ExitCode> {
    let endpoint = Endpoint::choose(args.url.as_deref(), args.socket.clone(), settings)?;
    let label = match &endpoint {
        Endpoint::Unix(p) => format!("unix:{}", p.display()),
        Endpoint::Tcp(a) => format!("http://{a}"),
    };
    let mut client = Client::new(endpoint);
    let color =
        !args.no_color && std::env::var_os("NO_COLOR").is_none() && std::io::stdout().is_terminal();

    if args.json {
        let body = fetch(&mut client).await?;
        println!("{}", String::from_utf8_lossy(&body).trim_end());
        return Ok(ExitCode::SUCCESS);
    }
    if !args.watch {
        let snapshot = parse(&fetch(&mut client).await?)?;
        print!("{}", render(&snapshot, &label, color));
        return Ok(ExitCode::SUCCESS);
    }

    let interval = Duration::from_secs_f64(args.interval);
    let mut out = std::io::stdout();
    // Hide the cursor while redrawing; show it again on the way out.
    let _ = write!(out, "\x1b[?25l");
    let result = watch(&mut client, &label, color, interval, &mut out).await;
    let _ = write!(out, "\x1b[?25h");
    let _ = out.flush();
    result.map(|()| ExitCode::SUCCESS)
}

async fn watch(
    client: &mut Client,
    label: &str,
    color: bool,
    interval: Duration,
    out: &mut std::io::Stdout,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = tick.tick() => {}
        }
        let screen = match fetch(client).await.and_then(|b| parse(&b)) {
            Ok(s) => render(&s, label, color),
            Err(e) => format!(
                "convstore status: {label}: {e:#}\n(retrying every {:.1} s; Ctrl-C to stop)\n",
                interval.as_secs_f64()
            ),
        };
        // Home, draw, clear what is left of the previous frame.
        let frame = screen.replace('\n', "\x1b[K\n");
        write!(out, "\x1b[H{frame}\x1b[J").context("cannot write to the terminal")?;
        out.flush().context("cannot write to the terminal")?;
    }
}

async fn fetch(client: &mut Client) -> anyhow::Result<bytes::Bytes> {
    let resp = client.get("/v1/stats").await?;
    if !resp.status.is_success() {
        bail!(
            "/v1/stats answered HTTP {}: {}",
            resp.status,
            String::from_utf8_lossy(&resp.body)
        );
    }
    Ok(resp.body)
}

fn parse(body: &[u8]) -> anyhow::Result<StatsSnapshot> {
    serde_json::from_slice(body)
        .context("/v1/stats answered JSON this version of convstore does not understand")
}

/// The screen for one snapshot.
pub fn render(s: &StatsSnapshot, endpoint: &str, color: bool) -> String {
    let paint = |code: &str, text: &str| {
        if color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    };
    let verdict_color = |v: Verdict| match v {
        Verdict::Healthy => "1;32",
        Verdict::Warning => "1;33",
        Verdict::Critical => "1;31",
    };
    let mut o = String::new();
    let health = format!("HEALTH: {}", s.health.status.as_str().to_uppercase());
    let _ = writeln!(
        o,
        "convstore {}  up {}  {}   {}",
        s.version,
        duration(s.uptime_seconds),
        endpoint,
        paint(verdict_color(s.health.status), &health)
    );
    for r in &s.health.reasons {
        let tag = format!("{:<8}", r.severity.as_str());
        let _ = writeln!(
            o,
            "  ! {} {}",
            paint(verdict_color(r.severity), &tag),
            r.message
        );
    }
    o.push('\n');

    let q = &s.queue;
    let fill = q.utilization.unwrap_or(0.0);
    // The backlog limit, when it admits less than the capacity.
    let admits = q
        .admission_limit
        .filter(|limit| *limit < q.capacity)
        .map_or(String::new(), |limit| format!("   admits {}", int(limit)));
    let _ = writeln!(
        o,
        "QUEUE      [{}] {} / {}  {:>5}   {} / {}{admits}{}",
        bar(fill, 30),
        int(q.depth),
        int(q.capacity),
        percent(q.utilization),
        bytes(q.bytes),
        bytes(q.max_bytes),
        if q.accepting {
            ""
        } else {
            "   (shutting down)"
        }
    );
    let mut pipeline = String::new();
    if let Some(n) = q.in_flight {
        let _ = write!(pipeline, "in flight {}   ", int(n));
    }
    if let Some(w) = q.workers {
        let _ = write!(pipeline, "workers {w}   ");
    }
    if let Some(b) = q.backlog_seconds.filter(|b| *b > 0.0) {
        let _ = write!(pipeline, "backlog {}   ", duration(b));
    }
    if let Some(u) = s.bottleneck.as_ref().and_then(|b| b.utilization) {
        let _ = write!(pipeline, "busy {}   ", percent(Some(u)));
    }
    let r = &s.rates;
    let _ = write!(
        pipeline,
        "batches {}/s (mean size {})",
        rate(r.batches_per_second),
        r.mean_batch_size.map_or("–".into(), |m| format!("{m:.1}"))
    );
    let _ = writeln!(o, "PIPELINE   {pipeline}");
    let _ = writeln!(
        o,
        "RATE /s    accepted {}   rejected {}   stored {}   failed {}   chunks {}   embed requests {}",
        rate(r.accepted_per_second),
        rate(r.rejected_per_second),
        rate(r.stored_per_second),
        rate(r.failed_per_second),
        rate(r.chunks_per_second),
        rate(r.embed_requests_per_second),
    );
    o.push('\n');

    let _ = writeln!(
        o,
        "LATENCY    {:<18}{:>10}{:>10}{:>10}{:>10}{:>10}{:>9}",
        "stage", "p50", "p95", "p99", "mean", "max", "count"
    );
    for stage in Stage::ALL {
        let l: &StageLatency = s.latency.get(stage);
        let label = match stage {
            Stage::Enqueue => "enqueue",
            Stage::QueueWait => "queue wait",
            Stage::Embed => "embed (request)",
            Stage::Store => "store (batch)",
            Stage::EndToEnd => "end to end",
        };
        let _ = writeln!(
            o,
            "           {:<18}{:>10}{:>10}{:>10}{:>10}{:>10}{:>9}",
            label,
            millis(l.p50_ms),
            millis(l.p95_ms),
            millis(l.p99_ms),
            millis(l.mean_ms),
            millis(l.max_ms),
            int(l.count)
        );
    }
    match &s.bottleneck {
        Some(b) => {
            let _ = writeln!(
                o,
                "BOTTLENECK {}  {} of end-to-end time{}",
                paint("1", &b.stage),
                percent(Some(b.share)),
                if b.saturated {
                    "  (workers saturated)"
                } else {
                    ""
                }
            );
            let _ = writeln!(o, "           {}", b.summary);
        }
        None => {
            let _ = writeln!(o, "BOTTLENECK –  (nothing stored in the last minute)");
        }
    }
    o.push('\n');

    let c = &s.cache;
    let tiers: Vec<String> = c
        .tiers
        .iter()
        .map(|t| format!("{} {}", t.tier, percent(t.hit_ratio)))
        .collect();
    let _ = writeln!(
        o,
        "CACHE      hit ratio {} (since start {})   entries {}   {}",
        percent(c.hit_ratio),
        percent(c.hit_ratio_total),
        int(c.entries),
        tiers.join("   ")
    );
    if s.backends.is_empty() {
        let _ = writeln!(o, "BACKENDS   (no embedding call yet)");
    } else {
        let _ = writeln!(
            o,
            "BACKENDS   {:<18}{:>6}{:>10}{:>9}{:>10}{:>10}{:>10}",
            "name", "up", "req/s", "err", "p50", "p95", "requests"
        );
        for b in &s.backends {
            let up = match b.up {
                Some(true) => paint("32", &format!("{:>6}", "up")),
                Some(false) => paint("1;31", &format!("{:>6}", "DOWN")),
                None => format!("{:>6}", "?"),
            };
            let mut gauges = String::new();
            if let Some(engine) = &b.engine {
                let _ = write!(gauges, "  engine {engine}");
            }
            for (k, v) in &b.gauges {
                let _ = write!(gauges, "  {k} {v}");
            }
            let _ = writeln!(
                o,
                "           {:<18}{}{:>10}{:>9}{:>10}{:>10}{:>10}{}",
                b.name,
                up,
                rate(b.requests_per_second),
                percent(b.error_ratio),
                millis(b.p50_ms),
                millis(b.p95_ms),
                int(b.requests),
                gauges
            );
        }
    }
    match &s.pending_embedding {
        Some(p) => {
            let _ = writeln!(
                o,
                "PENDING    {} conversations, {} chunks wait for an embedding{} (sampled {} ago)",
                int(p.conversations),
                int(p.chunks),
                if p.growing { ", growing" } else { "" },
                duration(p.age_seconds)
            );
        }
        None => {
            let _ = writeln!(o, "PENDING    (not sampled yet)");
        }
    }
    for m in &s.models {
        let _ = writeln!(
            o,
            "MODEL      {:<8} {} ({} dims): {} vectors, coverage {}{}{}",
            m.role,
            m.model,
            m.dimensions,
            int(m.vectors),
            percent(Some(m.coverage)),
            m.pending
                .filter(|n| *n > 0)
                .map(|n| format!(", {} pending", int(n)))
                .unwrap_or_default(),
            if m.searched { ", searched" } else { "" },
        );
    }
    let t = &s.totals;
    let _ = writeln!(
        o,
        "TOTALS     accepted {}   stored {}   rejected {}   failed {}   duplicates {}   chunks {} embedded / {} pending / {} failed",
        int(t.accepted),
        int(t.stored),
        int(t.rejected),
        int(t.failed),
        int(t.duplicates),
        int(t.chunks_embedded),
        int(t.chunks_pending),
        int(t.chunks_failed),
    );
    if t.replaced + t.appended + t.discarded > 0 {
        let _ = writeln!(
            o,
            "CHANGES    replaced {}   appended {} ({} messages)   discarded {}",
            int(t.replaced),
            int(t.appended),
            int(t.messages_appended),
            int(t.discarded),
        );
    }
    let d = &s.deleted;
    if d.api + d.erase + d.retention > 0 {
        let _ = writeln!(
            o,
            "DELETED    by request {}   by user erasure {}   by retention {}",
            int(d.api),
            int(d.erase),
            int(d.retention),
        );
    }
    if let Some(p) = &s.process {
        let _ = writeln!(
            o,
            "PROCESS    rss {}   cpu {} cores   fds {} / {}   threads {}",
            bytes(p.rss_bytes),
            p.cpu_ratio.map_or("–".into(), |c| format!("{c:.2}")),
            int(p.open_fds),
            p.max_fds.map_or("–".into(), int),
            p.threads
        );
    }
    o
}

fn bar(fill: f64, width: usize) -> String {
    let filled = ((fill.clamp(0.0, 1.0) * width as f64).round() as usize).min(width);
    format!("{}{}", "#".repeat(filled), ".".repeat(width - filled))
}

/// 1234567 → "1,234,567".
fn int(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn rate(v: f64) -> String {
    if v >= 1000.0 {
        int(v.round() as u64)
    } else {
        format!("{v:.1}")
    }
}

fn percent(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{:.1} %", v * 100.0))
}

/// Milliseconds, in the unit that reads best (µs, ms, s).
fn millis(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(ms) if ms < 1.0 => format!("{:.0} µs", ms * 1000.0),
        Some(ms) if ms < 10.0 => format!("{ms:.2} ms"),
        Some(ms) if ms < 1000.0 => format!("{ms:.0} ms"),
        Some(ms) => format!("{:.2} s", ms / 1000.0),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    let (d, h, m) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60);
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{:02}s", s % 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use convstore_telemetry::stats::{LiveQueue, Stats};

    #[test]
    fn numbers_read_well() {
        assert_eq!(int(0), "0");
        assert_eq!(int(1234), "1,234");
        assert_eq!(int(1_234_567), "1,234,567");
        assert_eq!(millis(Some(0.018)), "18 µs");
        assert_eq!(millis(Some(3.25)), "3.25 ms");
        assert_eq!(millis(Some(312.4)), "312 ms");
        assert_eq!(millis(Some(2500.0)), "2.50 s");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024), "3.0 MiB");
        assert_eq!(duration(3725.0), "1h02m");
        assert_eq!(bar(0.5, 10), "#####.....");
        assert!(parse_interval("0").is_err() && parse_interval("2").is_ok());
    }

    #[test]
    fn renders_every_section() {
        let stats = Stats::new(Instant::now());
        stats.record_stage(Stage::Embed, 0.3);
        stats.backend("ollama-1").set_up(0.0);
        stats.set_models(vec![
            convstore_telemetry::stats::ModelView {
                model: "mxbai-embed-large".into(),
                dimensions: 1024,
                role: "current".into(),
                searched: false,
                coverage: 0.25,
                vectors: 250,
                pending: Some(750),
            },
            convstore_telemetry::stats::ModelView {
                model: "all-minilm".into(),
                dimensions: 384,
                role: "previous".into(),
                searched: true,
                coverage: 1.0,
                vectors: 1000,
                pending: None,
            },
        ]);
        let snap = stats.snapshot(LiveQueue {
            depth: 60,
            capacity: 100,
            admission_limit: 80,
            bytes: 2048,
            max_bytes: 1 << 20,
            accepting: true,
            journal_writable: None,
            oldest_age_seconds: None,
        });
        let text = render(&snap, "unix:/run/convstore/convstore.sock", false);
        for needle in [
            "HEALTH: CRITICAL",
            "queue 60 % full",
            "QUEUE      [##################............]",
            "admits 80",
            "embed (request)",
            "300 ms",
            "ollama-1",
            "DOWN",
            "BOTTLENECK –",
            "MODEL      current  mxbai-embed-large (1024 dims): 250 vectors, coverage 25.0 %, 750 pending",
            "MODEL      previous all-minilm (384 dims): 1,000 vectors, coverage 100.0 %, searched",
            "TOTALS",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        assert!(!text.contains('\x1b'), "no colour asked for");
    }
}
