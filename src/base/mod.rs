//! The leaves: what every layer above may use and what uses nothing of fulcrum's own. The
//! validated config, the cheap clock, metric names and the recorder, error-chain walking,
//! certificate loading, the web node's health schema and the generated registry messages.

pub mod certs;
pub mod clock;
pub mod config;
pub mod error;
pub mod health_report;
pub mod metrics;
pub mod proto;
