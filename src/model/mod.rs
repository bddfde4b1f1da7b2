//! The model: backends as nodes whose state outlives a swap, the strategies that pick among
//! them, and the pool that publishes both as one `ArcSwap` snapshot with its connection caps.
//! Nothing here does I/O of its own beyond the upstream connections a node keeps.

pub mod balance;
pub(crate) mod node;
pub mod pool;
