//! What the benchmarks share to read their knobs and summarise samples.
//! Include it with `#[path = "support/knobs.rs"] mod knobs;`.
#![allow(dead_code)]

/// `name` from the environment as a positive number, else `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0)
        .unwrap_or(default)
}

/// The `p` quantile (0 to 1) of `sorted`, by nearest rank; 0 when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
