//! The leaves: what every layer above may use and what uses nothing of fulcrum's own. The
//! validated config, the cheap clock, metric names and the recorder, error-chain walking,
//! certificate loading, the web node's health schema and the generated registry messages.

pub(crate) mod certs;
pub(crate) mod clock;
pub mod config;
pub(crate) mod error;
pub(crate) mod health_report;
pub(crate) mod heap;
pub(crate) mod metrics;
pub mod proto;
pub(crate) mod workers;
