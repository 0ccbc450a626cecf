//! Compression of stored records: the `[pool] compression` setting, and one block
//! compressed (kept only when it shrinks) or decompressed (never past the block's
//! length: a damaged or hostile frame cannot make the node allocate more).

use std::cell::RefCell;

/// How the node compresses the records it writes (`[pool] compression` in
/// node.toml, for delta records (before-images) and the pieces of log sources,
/// `logs/chunks.rs`; `[pool] journal_compression` for journal records).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Records are kept raw.
    Off,
    /// zstd at this level (1..=19).
    Zstd(u8),
}

impl Compression {
    /// The levels `zstd:N` takes.
    pub const LEVELS: std::ops::RangeInclusive<u8> = 1..=19;

    /// Parses `"off"` or `"zstd:N"` (N in 1..=19); the error says what is wrong.
    pub fn parse(s: &str) -> Result<Compression, String> {
        if s == "off" {
            return Ok(Compression::Off);
        }
        let level = s
            .strip_prefix("zstd:")
            .ok_or_else(|| format!("\"{s}\" is neither \"off\" nor \"zstd:N\" (N from 1 to 19)"))?;
        match level.parse::<u8>() {
            Ok(n) if Compression::LEVELS.contains(&n) => Ok(Compression::Zstd(n)),
            _ => Err(format!(
                "\"{s}\": the zstd level must be a whole number from 1 to 19"
            )),
        }
    }
}

/// zstd level 1. On 400 MB of this machine's `/usr` (binaries, libraries, docs) in
/// 64 KiB blocks, compressed one block at a time as the node does (`zstd -b1 -e3
/// -B65536`, December 7): level 1 kept 45.4% of the bytes at 196 MB/s, level 3
/// 43.8% at 144 MB/s: level 3 saves 3.5% more space for 36% more CPU, and a
/// sync's journal and a settle compress on the node's CPU, which full syncs here
/// are already short of.
impl Default for Compression {
    fn default() -> Compression {
        Compression::Zstd(1)
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::Off => f.write_str("off"),
            Compression::Zstd(n) => write!(f, "zstd:{n}"),
        }
    }
}

thread_local! {
    /// One compression context per thread (and level), reused: making one per
    /// record costs more than compressing a block.
    static COMPRESSOR: RefCell<Option<(u8, zstd::bulk::Compressor<'static>)>> =
        const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// Compresses `data` into `out` (cleared first) with `c`: true when `out` then holds
/// a zstd frame smaller than `data`; false (keep the record raw) when compression
/// is off, the frame would not be smaller, or zstd failed.
pub(super) fn compress_block(c: Compression, data: &[u8], out: &mut Vec<u8>) -> bool {
    let Compression::Zstd(level) = c else {
        return false;
    };
    out.clear();
    if data.len() < 2 {
        return false;
    }
    // Room for one byte less than the block: a frame that does not fit is not
    // smaller, and zstd says so (destination too small) instead of writing it.
    out.reserve_exact(data.len() - 1);
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().is_none_or(|(l, _)| *l != level) {
            match zstd::bulk::Compressor::new(i32::from(level)) {
                Ok(c) => *cell = Some((level, c)),
                Err(e) => {
                    tracing::warn!("cannot make a zstd context: {e}; the record is kept raw");
                    return false;
                }
            }
        }
        let Some((_, compressor)) = cell.as_mut() else {
            return false;
        };
        match compressor.compress_to_buffer(data, out) {
            Ok(n) => n < data.len() && out.len() == n,
            Err(_) => false,
        }
    })
}

/// Decompresses one stored frame into exactly `len` bytes (a block): the output
/// buffer is `len` bytes and zstd never writes past it, so a frame that claims or
/// decodes to more is refused without allocating it, as is one that decodes to
/// fewer bytes or does not decode.
pub(super) fn decompress_block(frame: &[u8], len: usize) -> Result<Vec<u8>, String> {
    let mut out: Vec<u8> = Vec::new();
    out.try_reserve_exact(len)
        .map_err(|e| format!("cannot hold a block of {len} bytes: {e}"))?;
    DECOMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = Some(
                zstd::bulk::Decompressor::new()
                    .map_err(|e| format!("cannot make a zstd context: {e}"))?,
            );
        }
        let Some(d) = cell.as_mut() else {
            return Err("no zstd context".to_string());
        };
        let n = d.decompress_to_buffer(frame, &mut out).map_err(|e| {
            format!("the zstd frame does not decode into the block's {len} bytes: {e}")
        })?;
        if n != len || out.len() != len {
            return Err(format!(
                "the zstd frame decodes to {n} bytes, the block has {len}"
            ));
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setting_parses_or_says_what_is_wrong() {
        assert_eq!(Compression::parse("off"), Ok(Compression::Off));
        assert_eq!(Compression::parse("zstd:1"), Ok(Compression::Zstd(1)));
        assert_eq!(Compression::parse("zstd:19"), Ok(Compression::Zstd(19)));
        for bad in [
            "zstd:0", "zstd:20", "zstd:", "zstd:x", "lz4", "zstd", "ZSTD:3", "",
        ] {
            let e = Compression::parse(bad).expect_err(bad);
            assert!(e.contains(&format!("\"{bad}\"")), "{bad}: {e}");
        }
        assert_eq!(Compression::Zstd(7).to_string(), "zstd:7");
        assert_eq!(Compression::Off.to_string(), "off");
    }

    #[test]
    fn a_block_round_trips_and_an_incompressible_one_is_not_compressed() {
        let block: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8 / 4).collect();
        let mut frame = Vec::new();
        assert!(compress_block(Compression::Zstd(3), &block, &mut frame));
        assert!(frame.len() < block.len() / 4, "{}", frame.len());
        assert_eq!(decompress_block(&frame, block.len()), Ok(block.clone()));
        // Off keeps it raw.
        assert!(!compress_block(Compression::Off, &block, &mut frame));
        // Random bytes do not shrink.
        let mut noise = vec![0u8; 65536];
        rand::Rng::fill(&mut rand::rng(), &mut noise[..]);
        assert!(!compress_block(Compression::Zstd(1), &noise, &mut frame));
        // A frame of the wrong length is refused.
        assert!(compress_block(Compression::Zstd(1), &block, &mut frame));
        assert!(decompress_block(&frame, block.len() - 1).is_err());
        assert!(decompress_block(&frame, block.len() + 1).is_err());
        assert!(decompress_block(b"not zstd", block.len()).is_err());
    }
}
