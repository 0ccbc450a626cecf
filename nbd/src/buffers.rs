//! Payload buffers of one connection (`BufferPool`), reused so that steady traffic
//! allocates nothing.

use std::sync::{Arc, Mutex};

/// Pooled buffers kept per connection, and the largest kept.
const POOLED_BUFFERS: usize = 16;
const POOLED_BUFFER_MAX: usize = 2 * 1024 * 1024;

/// Payload buffers of one connection, reused so that steady traffic allocates
/// nothing. Buffers stay initialised, so reuse costs no memset either.
#[derive(Default)]
pub(crate) struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    pub(crate) fn get(self: &Arc<Self>, len: usize) -> PooledBuf {
        let mut buf = self
            .free
            .lock()
            .ok()
            .and_then(|mut free| free.pop())
            .unwrap_or_default();
        if buf.len() < len {
            buf.resize(len, 0);
        }
        PooledBuf {
            buf,
            len,
            pool: Arc::clone(self),
        }
    }
}

/// A buffer of `len` bytes that goes back to its pool when dropped.
pub(crate) struct PooledBuf {
    buf: Vec<u8>,
    len: usize,
    pool: Arc<BufferPool>,
}

impl std::ops::Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::ops::DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        if buf.capacity() == 0 || buf.capacity() > POOLED_BUFFER_MAX {
            return;
        }
        if let Ok(mut free) = self.pool.free.lock()
            && free.len() < POOLED_BUFFERS
        {
            free.push(buf);
        }
    }
}
