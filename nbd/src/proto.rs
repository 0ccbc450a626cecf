//! NBD wire format: constants from the protocol document and the encoding and
//! decoding of every fixed-layout message the server and client exchange.
//!
//! Everything here is pure (no I/O), so that the edge cases (short buffers, lengths
//! that do not add up, strings that are not UTF-8) are unit-tested without sockets.
//! All integers are big-endian on the wire.

use std::fmt;

// Magic numbers.

/// `NBDMAGIC`, the first eight bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle greeting, and the prefix of every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Second magic of the withdrawn oldstyle handshake (recognised only to refuse it).
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.

/// Server handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: may omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the server must not send the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.

/// Always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// The export rejects writes.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// The export behaves like a rotational disk.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// `NBD_CMD_TRIM` is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_WRITE_ZEROES` is supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_CMD_FLAG_DF` is supported on reads.
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Flushes and FUA are visible across all connections to the export.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_CMD_RESIZE` is supported.
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
/// `NBD_CMD_CACHE` is supported.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Options.

/// Choose an export and enter transmission (cannot report errors).
pub const OPT_EXPORT_NAME: u32 = 1;
/// End the negotiation.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// Upgrade to TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Describe an export without entering transmission.
pub const OPT_INFO: u32 = 6;
/// Describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Use structured replies in transmission.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// List metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Select metadata contexts for `NBD_CMD_BLOCK_STATUS`.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// 64-bit extended headers (not supported by this implementation).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types.

/// The option succeeded (or a list ended).
pub const REP_ACK: u32 = 1;
/// One export in an `NBD_OPT_LIST` answer.
pub const REP_SERVER: u32 = 2;
/// One piece of export information for `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub const REP_INFO: u32 = 3;
/// One metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit set in every error reply type.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// The option is unknown to the server.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// The option is forbidden by server policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// The option is malformed.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// The option is not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// TLS is required first.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// The export does not exist.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// The server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// The client must request block sizes to use this export.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// The request is too large.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;
/// Extended headers are required.
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_FLAG_ERROR | 10;

// Information types in `NBD_REP_INFO`.

/// Size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Canonical export name.
pub const INFO_NAME: u16 = 1;
/// Human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.

/// Read.
pub const CMD_READ: u16 = 0;
/// Write (the request carries a payload).
pub const CMD_WRITE: u16 = 1;
/// Soft disconnect: no reply.
pub const CMD_DISC: u16 = 2;
/// Persist every completed write.
pub const CMD_FLUSH: u16 = 3;
/// Discard (advisory).
pub const CMD_TRIM: u16 = 4;
/// Prefetch (not supported here).
pub const CMD_CACHE: u16 = 5;
/// Write zeroes without a payload.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Query metadata contexts.
pub const CMD_BLOCK_STATUS: u16 = 7;
/// Resize (not supported here).
pub const CMD_RESIZE: u16 = 8;

// Command flags.

/// Force unit access: persist before replying.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_WRITE_ZEROES` must not punch holes.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Do not fragment a read reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Block status: one extent is enough.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Write zeroes must fail fast rather than be slow.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// The length field is the payload length (extended headers only).
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Structured replies.

/// The last chunk of a structured reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Empty final chunk.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Offset plus data.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Offset plus the length of a run of zeroes.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Context id plus (length, flags) descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// 64-bit block status (extended headers only).
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Bit set in every error chunk type.
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
/// Error with a message.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
/// Error with a message and the offset it concerns.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

// Metadata contexts.

/// The one context the protocol defines.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation`: the extent is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation`: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:NAME`: the extent is dirty.
pub const STATE_DIRTY: u32 = 1 << 0;

// Limits.

/// Largest payload (write data, read reply data) either side sends or accepts.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Preferred block size this server advertises.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Longest string (export name, context name, message) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// Longest option data the server reads; anything longer is a denial of service.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;

/// An NBD error value, as carried in replies. Only the values the protocol defines
/// are sent; [`Errno::from_io`] maps any local error onto one of them.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub u32);

impl Errno {
    /// Operation not permitted (writes to a read-only export).
    pub const EPERM: Errno = Errno(1);
    /// Input/output error.
    pub const EIO: Errno = Errno(5);
    /// Cannot allocate memory.
    pub const ENOMEM: Errno = Errno(12);
    /// Invalid argument (bad flags, out of range, unknown command).
    pub const EINVAL: Errno = Errno(22);
    /// No space left on device (also writes beyond the end).
    pub const ENOSPC: Errno = Errno(28);
    /// Value too large (a read longer than the maximum payload).
    pub const EOVERFLOW: Errno = Errno(75);
    /// Operation not supported.
    pub const ENOTSUP: Errno = Errno(95);
    /// The server is shutting down.
    pub const ESHUTDOWN: Errno = Errno(108);

    /// The symbolic name, or `"E?"` for a value the protocol does not define.
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "EPERM",
            5 => "EIO",
            12 => "ENOMEM",
            22 => "EINVAL",
            28 => "ENOSPC",
            75 => "EOVERFLOW",
            95 => "ENOTSUP",
            108 => "ESHUTDOWN",
            _ => "E?",
        }
    }

    /// The NBD error closest to a local I/O error. The protocol allows only a few
    /// values, so e.g. `EDQUOT` and `EFBIG` become `ENOSPC` and anything unknown `EIO`.
    pub fn from_io(e: &std::io::Error) -> Errno {
        if let Some(code) = e.raw_os_error() {
            return match code {
                libc::EPERM | libc::EACCES | libc::EROFS => Errno::EPERM,
                libc::ENOMEM => Errno::ENOMEM,
                libc::EINVAL => Errno::EINVAL,
                libc::ENOSPC | libc::EDQUOT | libc::EFBIG => Errno::ENOSPC,
                libc::EOVERFLOW => Errno::EOVERFLOW,
                libc::EOPNOTSUPP => Errno::ENOTSUP,
                libc::ESHUTDOWN => Errno::ESHUTDOWN,
                _ => Errno::EIO,
            };
        }
        use std::io::ErrorKind as K;
        match e.kind() {
            K::PermissionDenied | K::ReadOnlyFilesystem => Errno::EPERM,
            K::OutOfMemory => Errno::ENOMEM,
            K::InvalidInput => Errno::EINVAL,
            K::StorageFull | K::QuotaExceeded | K::FileTooLarge => Errno::ENOSPC,
            K::Unsupported => Errno::ENOTSUP,
            _ => Errno::EIO,
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Name of a command type, for logs and errors.
pub fn command_name(typ: u16) -> &'static str {
    match typ {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        CMD_RESIZE => "RESIZE",
        _ => "unknown command",
    }
}

/// Name of an option, for logs and errors.
pub fn option_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        4 => "NBD_OPT_PEEK_EXPORT",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
        _ => "unknown option",
    }
}

/// Name of an option reply type, for errors.
pub fn reply_type_name(typ: u32) -> &'static str {
    match typ {
        REP_ACK => "NBD_REP_ACK",
        REP_SERVER => "NBD_REP_SERVER",
        REP_INFO => "NBD_REP_INFO",
        REP_META_CONTEXT => "NBD_REP_META_CONTEXT",
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        REP_ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD",
        t if t & REP_FLAG_ERROR != 0 => "unknown option error",
        _ => "unknown option reply",
    }
}

/// A transmission request header (the payload of a write follows it on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `CMD_FLAG_*` bits.
    pub flags: u16,
    /// `CMD_*` type.
    pub typ: u16,
    /// Opaque value the reply echoes.
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Length in bytes (of the payload for writes, of the effect otherwise).
    pub len: u32,
}

impl Request {
    /// Bytes of a request header on the wire.
    pub const LEN: usize = 28;

    /// The header as sent.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.typ.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Parses a header; the only thing that can be wrong at this level is the magic.
    pub fn decode(b: &[u8; Self::LEN]) -> Result<Request, DecodeError> {
        let magic = be_u32(&b[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(DecodeError::RequestMagic { found: magic });
        }
        Ok(Request {
            flags: be_u16(&b[4..6]),
            typ: be_u16(&b[6..8]),
            cookie: be_u64(&b[8..16]),
            offset: be_u64(&b[16..24]),
            len: be_u32(&b[24..28]),
        })
    }

    /// `offset + len`, or `None` when it overflows `u64`.
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(u64::from(self.len))
    }
}

/// Appends a simple reply header.
pub fn put_simple_reply(out: &mut Vec<u8>, error: Errno, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.0.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;

/// Appends a structured reply chunk header; `len` is the payload that follows.
pub fn put_chunk_header(out: &mut Vec<u8>, flags: u16, typ: u16, cookie: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&typ.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Appends a final `NBD_REPLY_TYPE_ERROR` chunk. The message is cut to
/// [`MAX_STRING`] bytes at a character boundary.
pub fn put_error_chunk(out: &mut Vec<u8>, cookie: u64, error: Errno, message: &str) {
    let msg = truncate_str(message, MAX_STRING);
    // Both fit: msg is at most 4096 bytes.
    let len = 6 + msg.len() as u32;
    put_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, len);
    out.extend_from_slice(&error.0.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
}

/// Appends a final `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for one context.
pub fn put_block_status_chunk(
    out: &mut Vec<u8>,
    cookie: u64,
    context: u32,
    extents: &[(u32, u32)],
) {
    let len = 4 + 8 * extents.len();
    put_chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        u32::try_from(len).unwrap_or(u32::MAX),
    );
    out.extend_from_slice(&context.to_be_bytes());
    for &(len, flags) in extents {
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
}

/// The header of one reply as the client reads it: the first 4 bytes say which kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply; for a successful read, the data follows.
    Simple {
        /// Zero, or an NBD error.
        error: u32,
        /// The request's cookie.
        cookie: u64,
    },
    /// One chunk of a structured reply; `len` bytes of payload follow.
    Chunk {
        /// `REPLY_FLAG_*` bits.
        flags: u16,
        /// `REPLY_TYPE_*`.
        typ: u16,
        /// The request's cookie.
        cookie: u64,
        /// Payload bytes.
        len: u32,
    },
}

/// Option request header: magic, option, data length.
pub fn encode_option_header(option: u32, len: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&len.to_be_bytes());
    b
}

/// Appends an option reply with its data.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, typ: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&typ.to_be_bytes());
    // Option reply data is built by this module and never near 4 GiB.
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(data);
}

/// A parsed option reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this answers.
    pub option: u32,
    /// `REP_*`.
    pub typ: u32,
    /// Bytes of data that follow.
    pub len: u32,
}

impl OptionReplyHeader {
    /// Bytes on the wire.
    pub const LEN: usize = 20;

    /// Parses the header, checking the magic.
    pub fn decode(b: &[u8; Self::LEN]) -> Result<OptionReplyHeader, DecodeError> {
        let magic = be_u64(&b[0..8]);
        if magic != OPTION_REPLY_MAGIC {
            return Err(DecodeError::OptionReplyMagic { found: magic });
        }
        Ok(OptionReplyHeader {
            option: be_u32(&b[8..12]),
            typ: be_u32(&b[12..16]),
            len: be_u32(&b[16..20]),
        })
    }
}

/// Data of `NBD_OPT_INFO` and `NBD_OPT_GO`: an export name and the information
/// types the client asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name.
    pub name: String,
    /// Requested `INFO_*` types.
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Option data as sent.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(6 + self.name.len() + 2 * self.requests.len());
        put_string32(&mut b, &self.name);
        b.extend_from_slice(&(self.requests.len() as u16).to_be_bytes());
        for r in &self.requests {
            b.extend_from_slice(&r.to_be_bytes());
        }
        b
    }

    /// Parses option data; every length must add up exactly.
    pub fn decode(data: &[u8]) -> Result<InfoRequest, DecodeError> {
        let mut c = Cursor::new(data);
        let name = c.string32("export name")?;
        let n = c.u16("number of information requests")?;
        let mut requests = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            requests.push(c.u16("information request")?);
        }
        c.finish()?;
        Ok(InfoRequest { name, requests })
    }
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export name.
    pub export: String,
    /// Queries (context names, or namespace prefixes when listing).
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// Option data as sent.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        put_string32(&mut b, &self.export);
        b.extend_from_slice(&(self.queries.len() as u32).to_be_bytes());
        for q in &self.queries {
            put_string32(&mut b, q);
        }
        b
    }

    /// Parses option data; every length must add up exactly.
    pub fn decode(data: &[u8]) -> Result<MetaContextRequest, DecodeError> {
        let mut c = Cursor::new(data);
        let export = c.string32("export name")?;
        let n = c.u32("number of queries")?;
        // Each query takes at least its 4-byte length, so a count that cannot fit in
        // the data is rejected before anything is allocated for it.
        if u64::from(n) * 4 > c.remaining() as u64 {
            return Err(DecodeError::QueriesCannotFit {
                count: n,
                remaining: c.remaining(),
            });
        }
        let mut queries = Vec::with_capacity(n as usize);
        for _ in 0..n {
            queries.push(c.string32("query")?);
        }
        c.finish()?;
        Ok(MetaContextRequest { export, queries })
    }
}

/// Appends a `u32` length and the string.
pub fn put_string32(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The longest prefix of `s` that is at most `max` bytes and ends on a character
/// boundary.
pub fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// What is wrong with a message that does not decode. The texts name the field
/// (`what`, as the decoder calls it) and the numbers that did not add up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A request header without [`REQUEST_MAGIC`].
    #[error("request magic is {found:#010x}, expected {:#010x}", REQUEST_MAGIC)]
    RequestMagic {
        /// The magic sent.
        found: u32,
    },
    /// An option reply header without [`OPTION_REPLY_MAGIC`].
    #[error(
        "option reply magic is {found:#018x}, expected {:#018x}",
        OPTION_REPLY_MAGIC
    )]
    OptionReplyMagic {
        /// The magic sent.
        found: u64,
    },
    /// The message ends before field `what`.
    #[error("{what}: needs {needed} bytes but only {remaining} remain")]
    Short {
        /// The field being read.
        what: &'static str,
        /// Bytes it takes.
        needed: usize,
        /// Bytes left in the message.
        remaining: usize,
    },
    /// A string longer than [`MAX_STRING`].
    #[error(
        "{what}: {len} bytes is longer than the {} the protocol allows",
        MAX_STRING
    )]
    StringTooLong {
        /// The field being read.
        what: &'static str,
        /// Its length as sent.
        len: usize,
    },
    /// A string that is not UTF-8.
    #[error("{what}: not UTF-8")]
    NotUtf8 {
        /// The field being read.
        what: &'static str,
    },
    /// A string with a NUL byte in it.
    #[error("{what}: contains NUL")]
    ContainsNul {
        /// The field being read.
        what: &'static str,
    },
    /// A meta context request counting more queries than its data can hold.
    #[error("{count} queries cannot fit in the {remaining} bytes that remain")]
    QueriesCannotFit {
        /// The count sent.
        count: u32,
        /// Bytes left for them.
        remaining: usize,
    },
    /// Bytes left over after the last field.
    #[error("{0} unexpected trailing bytes")]
    TrailingBytes(usize),
}

/// Reads big-endian fields from a byte slice; every read names what it reads so a
/// short or malformed message produces a useful error.
#[derive(Debug)]
pub struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Cursor<'a> {
        Cursor { buf }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Short {
                what,
                needed: n,
                remaining: self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// A big-endian `u16`.
    pub fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        self.take(2, what).map(be_u16)
    }

    /// A big-endian `u32`.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.take(4, what).map(be_u32)
    }

    /// A big-endian `u64`.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.take(8, what).map(be_u64)
    }

    /// A UTF-8 string of `n` bytes, at most [`MAX_STRING`].
    pub fn string(&mut self, n: usize, what: &'static str) -> Result<String, DecodeError> {
        if n > MAX_STRING {
            return Err(DecodeError::StringTooLong { what, len: n });
        }
        let b = self.take(n, what)?;
        let s = std::str::from_utf8(b).map_err(|_| DecodeError::NotUtf8 { what })?;
        if s.contains('\0') {
            return Err(DecodeError::ContainsNul { what });
        }
        Ok(s.to_string())
    }

    /// A string preceded by its `u32` length.
    pub fn string32(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let n = self.u32(what)?;
        self.string(n as usize, what)
    }

    /// Fails if anything is left over.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.buf.len()))
        }
    }
}

/// Big-endian `u16` from exactly two bytes.
pub fn be_u16(b: &[u8]) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[..2]);
    u16::from_be_bytes(a)
}

/// Big-endian `u32` from exactly four bytes.
pub fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

/// Big-endian `u64` from exactly eight bytes.
pub fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let r = Request {
            flags: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            typ: CMD_WRITE_ZEROES,
            cookie: 0x0102_0304_0506_0708,
            offset: u64::MAX - 5,
            len: u32::MAX,
        };
        let b = r.encode();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(Request::decode(&b), Ok(r));
        assert_eq!(r.end(), None, "offset + len overflows");
        let ok = Request {
            offset: 10,
            len: 5,
            ..r
        };
        assert_eq!(ok.end(), Some(15));
    }

    #[test]
    fn request_bad_magic() {
        let mut b = Request {
            flags: 0,
            typ: CMD_READ,
            cookie: 1,
            offset: 0,
            len: 512,
        }
        .encode();
        b[0] ^= 0xff;
        let e = Request::decode(&b).unwrap_err().to_string();
        assert!(e.contains("magic"), "{e}");
    }

    #[test]
    fn simple_and_chunk_headers() {
        let mut out = Vec::new();
        put_simple_reply(&mut out, Errno::EINVAL, 7);
        assert_eq!(out.len(), SIMPLE_REPLY_LEN);
        assert_eq!(&out[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(be_u32(&out[4..8]), 22);
        assert_eq!(be_u64(&out[8..16]), 7);

        out.clear();
        put_chunk_header(
            &mut out,
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            9,
            8 + 512,
        );
        assert_eq!(out.len(), CHUNK_HEADER_LEN);
        assert_eq!(be_u32(&out[0..4]), STRUCTURED_REPLY_MAGIC);
        assert_eq!(be_u16(&out[4..6]), REPLY_FLAG_DONE);
        assert_eq!(be_u16(&out[6..8]), REPLY_TYPE_OFFSET_DATA);
        assert_eq!(be_u64(&out[8..16]), 9);
        assert_eq!(be_u32(&out[16..20]), 520);
    }

    #[test]
    fn error_chunk_truncates_message_on_char_boundary() {
        let mut out = Vec::new();
        // 4095 ASCII bytes then a 2-byte character straddling the limit.
        let msg = format!("{}é", "x".repeat(MAX_STRING - 1));
        put_error_chunk(&mut out, 3, Errno::EIO, &msg);
        let len = be_u32(&out[16..20]) as usize;
        assert_eq!(out.len(), CHUNK_HEADER_LEN + len);
        assert_eq!(be_u16(&out[6..8]), REPLY_TYPE_ERROR);
        assert_eq!(be_u32(&out[20..24]), 5);
        let mlen = usize::from(be_u16(&out[24..26]));
        assert_eq!(mlen, MAX_STRING - 1);
        assert_eq!(len, 6 + mlen);
        assert!(std::str::from_utf8(&out[26..]).is_ok());
    }

    #[test]
    fn block_status_chunk_layout() {
        let mut out = Vec::new();
        put_block_status_chunk(
            &mut out,
            5,
            1,
            &[(4096, 0), (8192, STATE_HOLE | STATE_ZERO)],
        );
        assert_eq!(be_u32(&out[16..20]), 4 + 16);
        assert_eq!(be_u32(&out[20..24]), 1);
        assert_eq!(be_u32(&out[24..28]), 4096);
        assert_eq!(be_u32(&out[28..32]), 0);
        assert_eq!(be_u32(&out[32..36]), 8192);
        assert_eq!(be_u32(&out[36..40]), 3);
    }

    #[test]
    fn info_request_round_trip_and_errors() {
        let r = InfoRequest {
            name: "disk".into(),
            requests: vec![INFO_BLOCK_SIZE, INFO_NAME],
        };
        let b = r.encode();
        assert_eq!(InfoRequest::decode(&b), Ok(r.clone()));
        // Truncated request list.
        assert!(InfoRequest::decode(&b[..b.len() - 1]).is_err());
        // Trailing garbage.
        let mut long = b.clone();
        long.push(0);
        assert!(
            InfoRequest::decode(&long)
                .unwrap_err()
                .to_string()
                .contains("trailing")
        );
        // Name length beyond the data.
        let mut bad = b.clone();
        bad[0..4].copy_from_slice(&1000u32.to_be_bytes());
        assert!(InfoRequest::decode(&bad).is_err());
        // Name length beyond the protocol limit.
        let mut huge = b;
        huge[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(
            InfoRequest::decode(&huge)
                .unwrap_err()
                .to_string()
                .contains("longer")
        );
        // Empty data.
        assert!(InfoRequest::decode(&[]).is_err());
    }

    #[test]
    fn meta_context_request_round_trip_and_errors() {
        let r = MetaContextRequest {
            export: String::new(),
            queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:b0".into()],
        };
        let b = r.encode();
        assert_eq!(MetaContextRequest::decode(&b), Ok(r));
        // A query count that could not possibly fit is refused without allocating.
        let mut bad = Vec::new();
        put_string32(&mut bad, "");
        bad.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(
            MetaContextRequest::decode(&bad)
                .unwrap_err()
                .to_string()
                .contains("cannot fit")
        );
        // Non-UTF-8 query.
        let mut nonutf = Vec::new();
        put_string32(&mut nonutf, "");
        nonutf.extend_from_slice(&1u32.to_be_bytes());
        nonutf.extend_from_slice(&2u32.to_be_bytes());
        nonutf.extend_from_slice(&[0xff, 0xfe]);
        assert!(
            MetaContextRequest::decode(&nonutf)
                .unwrap_err()
                .to_string()
                .contains("UTF-8")
        );
        // NUL inside a name.
        let mut nul = Vec::new();
        put_string32(&mut nul, "a\0b");
        nul.extend_from_slice(&0u32.to_be_bytes());
        assert!(
            MetaContextRequest::decode(&nul)
                .unwrap_err()
                .to_string()
                .contains("NUL")
        );
    }

    #[test]
    fn option_reply_header() {
        let mut out = Vec::new();
        put_option_reply(&mut out, OPT_GO, REP_ERR_UNKNOWN, b"no such export");
        let mut h = [0u8; OptionReplyHeader::LEN];
        h.copy_from_slice(&out[..OptionReplyHeader::LEN]);
        let parsed = OptionReplyHeader::decode(&h).unwrap();
        assert_eq!(parsed.option, OPT_GO);
        assert_eq!(parsed.typ, REP_ERR_UNKNOWN);
        assert_eq!(parsed.len, 14);
        assert_eq!(reply_type_name(parsed.typ), "NBD_REP_ERR_UNKNOWN");
        h[0..8].copy_from_slice(&1u64.to_be_bytes());
        assert!(OptionReplyHeader::decode(&h).is_err());
    }

    #[test]
    fn errno_mapping() {
        use std::io::{Error, ErrorKind};
        let os = |c| Errno::from_io(&Error::from_raw_os_error(c));
        assert_eq!(os(libc::EROFS), Errno::EPERM);
        assert_eq!(os(libc::EDQUOT), Errno::ENOSPC);
        assert_eq!(os(libc::EFBIG), Errno::ENOSPC);
        assert_eq!(os(libc::EOPNOTSUPP), Errno::ENOTSUP);
        assert_eq!(os(libc::ENXIO), Errno::EIO);
        assert_eq!(
            Errno::from_io(&Error::from(ErrorKind::UnexpectedEof)),
            Errno::EIO
        );
        assert_eq!(
            Errno::from_io(&Error::from(ErrorKind::InvalidInput)),
            Errno::EINVAL
        );
        assert_eq!(Errno::EOVERFLOW.to_string(), "EOVERFLOW (75)");
        assert_eq!(Errno(4242).name(), "E?");
    }

    #[test]
    fn truncate_str_edges() {
        assert_eq!(truncate_str("abc", 5), "abc");
        assert_eq!(truncate_str("abc", 0), "");
        assert_eq!(truncate_str("aé", 2), "a");
    }
}
