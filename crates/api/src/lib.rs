//! The wire types convstore's API shares between the daemon that serves
//! them and the programs that read them (`convstore status`, dashboards,
//! clients): plain serde types, no runtime, no HTTP.

pub mod stats;
