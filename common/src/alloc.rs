//! Default space allocation of a data source on a storage node, used by the node when
//! it places a source on a pool disk and by the coordinator when it picks the node.

/// Days of recovery points the default allocation plans for.
pub const DEFAULT_RETENTION_DAYS: u64 = 7;

/// Replica space: 1.5 × the source size (room for growth and metadata).
pub fn replica_bytes(size_bytes: u64) -> u64 {
    size_bytes.saturating_add(size_bytes / 2)
}

/// Recovery-point space, the classic file-server rule: size × retention days × 2%
/// + 1.6 GiB.
pub fn points_bytes(size_bytes: u64, retention_days: u64) -> u64 {
    let churn = (size_bytes as u128 * retention_days as u128 * 2 / 100) as u64;
    churn.saturating_add(1_717_986_918)
}

/// Replica plus recovery-point space with the default retention.
pub fn default_total(size_bytes: u64) -> u64 {
    replica_bytes(size_bytes).saturating_add(points_bytes(size_bytes, DEFAULT_RETENTION_DAYS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_rule() {
        let gib = 1u64 << 30;
        assert_eq!(replica_bytes(100 * gib), 150 * gib);
        // 100 GiB × 7 × 2% = 14 GiB, + 1.6 GiB
        assert_eq!(points_bytes(100 * gib, 7), 14 * gib + 1_717_986_918);
    }
}
