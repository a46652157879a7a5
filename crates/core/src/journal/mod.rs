//! The journal's on-disk format: the framed, checksummed record and the
//! conversation entry it carries. The log itself (files, fsync, replay)
//! is the `convstore-journal` crate; the fuzz target reads these too.

pub mod entry;
pub mod record;
