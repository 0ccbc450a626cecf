//! What a connection negotiated in its handshake and takes into its transmission
//! phase (`Conn`), and the constants both phases share.

use std::sync::Arc;

use crate::backend::Backend;

/// Socket read buffer.
pub(crate) const READ_BUFFER: usize = 256 * 1024;
/// Context id of `base:allocation` once selected.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

/// What the transmission phase of one connection shares with the threads that run
/// its requests.
pub(crate) struct Conn {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) size: u64,
    pub(crate) read_only: bool,
    /// Structured replies were negotiated.
    pub(crate) structured: bool,
    pub(crate) base_allocation: Option<u32>,
}
