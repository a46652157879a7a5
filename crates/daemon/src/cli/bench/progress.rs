//! The progress bar on stderr while a run goes (hidden when stderr is not a
//! terminal, or with `--no-progress`), so the report on stdout stays clean.

use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::load::Live;

const TICK: Duration = Duration::from_millis(200);

pub struct Progress {
    bar: ProgressBar,
    ticker: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// A bar over `length` of time, fed by `live`'s counters.
    pub fn phase(enabled: bool, label: String, length: Duration, live: Arc<Live>) -> Self {
        let bar = if enabled {
            ProgressBar::with_draw_target(
                Some(u64::try_from(length.as_millis()).unwrap_or(u64::MAX)),
                ProgressDrawTarget::stderr(),
            )
        } else {
            ProgressBar::hidden()
        };
        if let Ok(style) =
            ProgressStyle::with_template("{prefix:>10} [{bar:30}] {elapsed:>4} {msg}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(label);
        let ticker = enabled.then(|| {
            let bar = bar.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let mut last = (started, live.snapshot().done);
                loop {
                    tokio::time::sleep(TICK).await;
                    let now = Instant::now();
                    let s = live.snapshot();
                    let rate = (s.done - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
                    last = (now, s.done);
                    bar.set_position(
                        u64::try_from(now.duration_since(started).as_millis()).unwrap_or(u64::MAX),
                    );
                    bar.set_message(format!(
                        "{} sent · {rate:.0}/s · accepted {} · 429 {} · errors {}",
                        s.sent, s.accepted, s.rejected, s.errors
                    ));
                }
            })
        });
        Self { bar, ticker }
    }

    /// A spinner while waiting for the daemon to commit.
    pub fn waiting(enabled: bool) -> Self {
        let bar = if enabled {
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
        } else {
            ProgressBar::hidden()
        };
        if let Ok(style) = ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}") {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(120));
        Self { bar, ticker: None }
    }

    pub fn message(&self, text: String) {
        self.bar.set_message(text);
    }

    /// Removes the bar from the terminal.
    pub fn finish(self) {
        if let Some(t) = &self.ticker {
            t.abort();
        }
        self.bar.finish_and_clear();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(t) = self.ticker.take() {
            t.abort();
        }
    }
}
