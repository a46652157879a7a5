//! The model task: how far each embedding model's vectors cover the
//! chunks (`/v1/stats` `models`, `convstore_embedding_model_*`), the switch
//! of search to the new model once a change of model has re-embedded every
//! chunk, and the drop of the previous model's vectors when
//! `search.keep_previous_model` is a duration (docs/SEARCH.md "Changing
//! the model"; the storage side is `convstore_store::models`).
//!
//! The re-embedding itself is the backfill's: a change of model leaves
//! every chunk pending for the new model. Any instance may switch (the
//! switch is one conditional `UPDATE`); every instance re-reads the state
//! at each sample, so searches everywhere follow within one period.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use convstore_store::Store;
use convstore_store::models::{KeepPrevious, ModelCoverage, ModelId, ModelState, VectorSet};
use convstore_telemetry::events::label;
use convstore_telemetry::metrics as m;
use convstore_telemetry::stats::ModelView;

/// Sampling period while search reads the previous model's vectors: the
/// switch follows the last re-embedded chunk within this.
const WHILE_MIGRATING: Duration = Duration::from_secs(2);
/// Sampling period otherwise (one count of the chunk table each time).
const OTHERWISE: Duration = Duration::from_secs(30);

/// What the task needs.
pub struct ModelTask {
    pub store: Arc<Store>,
    /// The configured model (`embedding.model`, `embedding.dimensions`).
    pub configured: ModelId,
    pub keep: KeepPrevious,
    /// Which model is which; searches read it.
    pub state: watch::Sender<ModelState>,
}

/// Samples, switches and drops until `stop`.
pub async fn run(task: ModelTask, stop: CancellationToken) {
    let mut published: Option<ModelId> = None;
    loop {
        task.step(&mut published).await;
        let every = if task.state.borrow().migrating() {
            WHILE_MIGRATING
        } else {
            OTHERWISE
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

impl ModelTask {
    async fn step(&self, published_previous: &mut Option<ModelId>) {
        // The state this instance switched from, logged with the coverage
        // sampled below (one count of the chunks per step).
        let mut switched_from = None;
        if self.state.borrow().migrating() {
            match self.store.retire_previous().await {
                Ok(true) => switched_from = Some(self.state.borrow().clone()),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot check whether the new model covers every chunk")
                }
            }
        }
        let retired = self
            .state
            .borrow()
            .previous
            .as_ref()
            .is_some_and(|p| p.retired_at.is_some());
        if let (KeepPrevious::For(after), true) = (self.keep, retired) {
            match self.store.drop_retired_previous(after).await {
                Ok(true) => tracing::info!(
                    after_seconds = after.as_secs(),
                    "Dropped the previous model's vectors (search.keep_previous_model)"
                ),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "Cannot drop the previous model's vectors"),
            }
        }
        // Another instance may have switched or dropped: follow the table.
        match self.store.model_state(&self.configured).await {
            Ok(now) => {
                self.state.send_if_modified(|state| {
                    let changed = *state != now;
                    *state = now;
                    changed
                });
            }
            Err(e) => tracing::warn!(error = %e, "Cannot read which embedding model is which"),
        }
        let coverage = match self.store.model_coverage().await {
            Ok(coverage) => {
                self.publish(&coverage, published_previous);
                coverage
            }
            Err(e) => {
                tracing::debug!(error = %e, "Cannot count the chunks' vectors");
                ModelCoverage::default()
            }
        };
        if let Some(state) = switched_from {
            log_switch(&state, &coverage);
        }
    }
}

/// The switch, with how many chunks were re-embedded in how long.
fn log_switch(state: &ModelState, coverage: &ModelCoverage) {
    let since = state.previous.as_ref().map(|p| p.since);
    let seconds = since.map(|s| (chrono::Utc::now() - s).as_seconds_f64());
    tracing::info!(
        from = state.previous.as_ref().map(|p| p.id.to_string()).unwrap_or_default(),
        to = %state.current,
        chunks = coverage.chunks,
        embedded = coverage.embedded,
        failed = coverage.failed,
        seconds = seconds.unwrap_or_default(),
        chunks_per_second = seconds
            .filter(|s| *s > 0.0)
            .map(|s| coverage.embedded as f64 / s)
            .unwrap_or_default(),
        "Search switched to the new model: no chunk is pending any more"
    );
}

impl ModelTask {
    fn publish(&self, coverage: &ModelCoverage, published_previous: &mut Option<ModelId>) {
        let state = self.state.borrow().clone();
        let searched = state.searched();
        let mut views = vec![ModelView {
            model: state.current.model.clone(),
            dimensions: state.current.dimensions as u64,
            role: VectorSet::Current.as_str().into(),
            searched: searched == VectorSet::Current,
            coverage: coverage.current_ratio(),
            vectors: coverage.embedded,
            pending: Some(coverage.pending),
        }];
        metrics::gauge!(
            m::MODEL_COVERAGE,
            label::MODEL => state.current.model.clone(),
            label::ROLE => VectorSet::Current.as_str()
        )
        .set(coverage.current_ratio());
        let previous = state
            .previous
            .as_ref()
            .filter(|_| coverage.previous_vectors.is_some());
        if let Some(previous) = previous {
            let ratio = coverage.previous_ratio().unwrap_or_default();
            views.push(ModelView {
                model: previous.id.model.clone(),
                dimensions: previous.id.dimensions as u64,
                role: VectorSet::Previous.as_str().into(),
                searched: searched == VectorSet::Previous,
                coverage: ratio,
                vectors: coverage.previous_vectors.unwrap_or_default(),
                pending: None,
            });
            metrics::gauge!(
                m::MODEL_COVERAGE,
                label::MODEL => previous.id.model.clone(),
                label::ROLE => VectorSet::Previous.as_str()
            )
            .set(ratio);
        }
        // A previous model that is gone stops showing as covering anything.
        if let Some(gone) = published_previous
            .take()
            .filter(|id| previous.is_none_or(|p| p.id != *id))
        {
            metrics::gauge!(
                m::MODEL_COVERAGE,
                label::MODEL => gone.model,
                label::ROLE => VectorSet::Previous.as_str()
            )
            .set(0.0);
        }
        *published_previous = previous.map(|p| p.id.clone());
        metrics::gauge!(m::MODEL_MIGRATING).set(if state.migrating() { 1.0 } else { 0.0 });
        convstore_telemetry::stats::global().set_models(views);
    }
}
