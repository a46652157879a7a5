//! convstore's parsing and validation sources, compiled on their own for
//! fuzzing (see Cargo.toml for why). The files compile unchanged: each is
//! mounted where its `crate::` and `super::` paths find what they name.
#![allow(dead_code, unused_imports)]

#[path = "../../src/model.rs"]
pub mod model;

// `super::` of the ingress files is the crate root here.
#[path = "../../src/ingress/batch_body.rs"]
pub mod batch_body;
#[path = "../../src/ingress/error.rs"]
pub mod error;
#[path = "../../src/ingress/fuzzing.rs"]
pub mod fuzzing;
#[path = "../../src/ingress/strict_json.rs"]
pub mod strict_json;
#[path = "../../src/ingress/validate.rs"]
pub mod validate;

#[path = "../../src/journal/entry.rs"]
pub mod journal_entry;
#[path = "../../src/journal/record.rs"]
pub mod journal_record;

pub mod journal {
    pub use super::journal_entry as entry;
    pub use super::journal_record as record;
}

pub mod ingress {
    pub use super::fuzzing;
}
