//! Shared pieces of the integration tests.
#![allow(dead_code)]

pub mod cluster;
pub mod daemon;
pub mod exposition;
pub mod labels;
pub mod nats;
