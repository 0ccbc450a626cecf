//! A blocking NBD client, for a reader thread that walks an export: read data, query
//! `base:allocation` or a qemu dirty bitmap (`qemu:dirty-bitmap:NAME`) with block
//! status, and occasionally write and flush.
//!
//! One request is in flight at a time, so replies are read straight into the
//! caller's buffer. Every reply is checked against the request it answers (cookie,
//! chunk bounds, coverage); anything inconsistent is a protocol violation that marks
//! the connection unusable, while an error the server reports (`EINVAL` for a range
//! past the end, say) leaves it usable for the next call.
//!
//! Handshake: fixed newstyle, `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_SET_META_CONTEXT`
//! with the contexts asked for (each must be granted), then `NBD_OPT_GO` asking for
//! block sizes (falling back to `NBD_OPT_EXPORT_NAME` on servers without it).

use std::io::{self, BufReader, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::NbdError;
use super::proto::{self, Errno, Request};

/// Longest block status request: the length field is 32 bits, kept to a multiple of
/// 512 KiB so that servers with coarse granularity see aligned ranges.
const MAX_BLOCK_STATUS_LEN: u64 = (u32::MAX as u64) / (512 * 1024) * (512 * 1024);
/// Largest option reply accepted during the handshake (names and messages are at
/// most 4 KiB).
const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Largest error chunk accepted (message of at most 4 KiB plus fixed fields).
const MAX_ERROR_CHUNK: u32 = 16 * 1024;
/// Largest block status chunk accepted: 2 million descriptors.
const MAX_BLOCK_STATUS_CHUNK: u32 = 16 * 1024 * 1024;

enum Transport {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Transport::Unix(s) => s.read(buf),
            Transport::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Transport::Unix(s) => s.write(buf),
            Transport::Tcp(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Transport::Unix(s) => s.write_vectored(bufs),
            Transport::Tcp(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Transport {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Transport::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Transport::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    fn shutdown(&self) -> io::Result<()> {
        match self {
            Transport::Unix(s) => s.shutdown(Shutdown::Both),
            Transport::Tcp(s) => s.shutdown(Shutdown::Both),
        }
    }
}

/// A connection to one export, in the transmission phase.
pub struct Client {
    io: BufReader<Transport>,
    size: u64,
    flags: u16,
    structured: bool,
    /// Granted metadata contexts: name and the id the server gave it.
    contexts: Vec<(String, u32)>,
    max_payload: u32,
    next_cookie: u64,
    /// Set once the stream can no longer be trusted to be in sync.
    broken: Option<String>,
    disconnected: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("size", &self.size)
            .field("flags", &format_args!("{:#x}", self.flags))
            .field("structured", &self.structured)
            .field("contexts", &self.contexts)
            .field("broken", &self.broken)
            .finish()
    }
}

impl Client {
    /// Connects over a Unix socket and negotiates `export` with `meta_contexts`.
    pub fn connect_unix(
        path: &Path,
        export: &str,
        meta_contexts: &[&str],
    ) -> Result<Client, NbdError> {
        let s = UnixStream::connect(path).map_err(|e| {
            NbdError::Io(io::Error::new(
                e.kind(),
                format!("cannot connect to {}: {e}", path.display()),
            ))
        })?;
        Client::handshake(Transport::Unix(s), export, meta_contexts)
    }

    /// Connects over TCP and negotiates `export` with `meta_contexts`.
    pub fn connect_tcp(
        addr: SocketAddr,
        export: &str,
        meta_contexts: &[&str],
    ) -> Result<Client, NbdError> {
        let s = TcpStream::connect(addr).map_err(|e| {
            NbdError::Io(io::Error::new(
                e.kind(),
                format!("cannot connect to {addr}: {e}"),
            ))
        })?;
        s.set_nodelay(true)?;
        Client::handshake(Transport::Tcp(s), export, meta_contexts)
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the server refuses writes.
    pub fn read_only(&self) -> bool {
        self.flags & proto::FLAG_READ_ONLY != 0
    }

    /// Fails reads and writes that take longer than `timeout` (after which the
    /// connection is unusable); `None` waits forever, the default.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), NbdError> {
        self.io.get_ref().set_timeouts(timeout)?;
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`, in requests of at most the server's
    /// maximum payload.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        self.usable()?;
        end_of(offset, buf.len() as u64)?;
        let max = self.max_payload as usize;
        let mut at = offset;
        for chunk in buf.chunks_mut(max) {
            self.guard(|c| c.read_one(at, chunk))?;
            at += chunk.len() as u64;
        }
        Ok(())
    }

    /// Writes `data` at `offset`, in requests of at most the server's maximum payload.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        self.usable()?;
        end_of(offset, data.len() as u64)?;
        let max = self.max_payload as usize;
        let mut at = offset;
        for chunk in data.chunks(max) {
            self.guard(|c| {
                let len = chunk.len() as u32;
                let cookie = c.send_request(proto::CMD_WRITE, 0, at, len, chunk)?;
                c.read_ack(cookie, || format!("WRITE of {len} bytes at offset {at}"))
            })?;
            at += chunk.len() as u64;
        }
        Ok(())
    }

    /// Makes every completed write durable on the server.
    pub fn flush(&mut self) -> Result<(), NbdError> {
        self.usable()?;
        if self.flags & proto::FLAG_SEND_FLUSH == 0 {
            return Err(NbdError::InvalidRequest(
                "the server does not support FLUSH".into(),
            ));
        }
        self.guard(|c| {
            let cookie = c.send_request(proto::CMD_FLUSH, 0, 0, 0, &[])?;
            c.read_ack(cookie, || "FLUSH".to_string())
        })
    }

    /// Block status of `[offset, offset+len)` in `context` (one of the names passed
    /// to connect): `(length, flags)` extents covering a prefix of the range from
    /// `offset` on. They may cover less than `len`; call again from where they end.
    /// For `base:allocation` the flags are `STATE_HOLE`/`STATE_ZERO`; for qemu's
    /// `qemu:dirty-bitmap:NAME`, bit 0 set means dirty.
    pub fn block_status(
        &mut self,
        offset: u64,
        len: u64,
        context: &str,
    ) -> Result<Vec<(u64, u32)>, NbdError> {
        self.usable()?;
        let Some(id) = self.contexts.iter().find(|c| c.0 == context).map(|c| c.1) else {
            return Err(NbdError::InvalidRequest(format!(
                "metadata context {context:?} was not negotiated on this connection"
            )));
        };
        end_of(offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let req_len = len.min(MAX_BLOCK_STATUS_LEN) as u32;
        self.guard(|c| c.block_status_one(offset, req_len, id, context))
    }

    /// Ends the session cleanly (`NBD_CMD_DISC`) and closes the socket.
    pub fn disconnect(mut self) -> Result<(), NbdError> {
        self.disconnected = true;
        if let Some(b) = &self.broken {
            return Err(NbdError::Broken(b.clone()));
        }
        let hdr = Request {
            flags: 0,
            typ: proto::CMD_DISC,
            cookie: 0,
            offset: 0,
            len: 0,
        }
        .encode();
        self.io.get_mut().write_all(&hdr)?;
        // The server may already have closed its end; that is the point.
        let _ = self.io.get_ref().shutdown();
        Ok(())
    }

    fn handshake(t: Transport, export: &str, meta_contexts: &[&str]) -> Result<Client, NbdError> {
        let mut io = BufReader::with_capacity(256 * 1024, t);
        let magic = read_u64(&mut io)?;
        if magic != proto::NBD_MAGIC {
            return Err(NbdError::Protocol(format!(
                "greeting starts with {magic:#018x}, not NBDMAGIC: not an NBD server?"
            )));
        }
        let magic = read_u64(&mut io)?;
        if magic == proto::CLISERV_MAGIC {
            return Err(NbdError::Negotiation(
                "the server uses the oldstyle handshake, which is not supported".into(),
            ));
        }
        if magic != proto::IHAVEOPT {
            return Err(NbdError::Protocol(format!(
                "greeting has {magic:#018x} where IHAVEOPT belongs"
            )));
        }
        let hflags = read_u16(&mut io)?;
        if hflags & proto::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdError::Negotiation(
                "the server does not support fixed newstyle negotiation".into(),
            ));
        }
        let no_zeroes = hflags & proto::FLAG_NO_ZEROES != 0;
        let mut cflags = proto::FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            cflags |= proto::FLAG_C_NO_ZEROES;
        }
        io.get_mut().write_all(&cflags.to_be_bytes())?;

        let mut c = Client {
            io,
            size: 0,
            flags: 0,
            structured: false,
            contexts: Vec::new(),
            max_payload: proto::MAX_PAYLOAD,
            next_cookie: 0,
            broken: None,
            // Not in transmission yet: dropping must not send NBD_CMD_DISC.
            disconnected: true,
        };
        match c.negotiate(export, meta_contexts, no_zeroes) {
            Ok(()) => {
                c.disconnected = false;
                Ok(c)
            }
            Err(e) => {
                if matches!(e, NbdError::Negotiation(_)) {
                    // Soft disconnect, without waiting for the acknowledgement.
                    let _ = c.send_option(proto::OPT_ABORT, &[]);
                }
                let _ = c.io.get_ref().shutdown();
                Err(e)
            }
        }
    }

    fn negotiate(
        &mut self,
        export: &str,
        meta_contexts: &[&str],
        no_zeroes: bool,
    ) -> Result<(), NbdError> {
        self.send_option(proto::OPT_STRUCTURED_REPLY, &[])?;
        let (typ, data) = self.option_reply(proto::OPT_STRUCTURED_REPLY)?;
        match typ {
            proto::REP_ACK => self.structured = true,
            proto::REP_ERR_UNSUP => {}
            t => return Err(refused(proto::OPT_STRUCTURED_REPLY, t, &data)),
        }
        if !meta_contexts.is_empty() {
            if !self.structured {
                return Err(NbdError::Negotiation(
                    "the server does not support structured replies, which block status needs"
                        .into(),
                ));
            }
            self.set_meta_contexts(export, meta_contexts)?;
        }
        self.go(export, no_zeroes)
    }

    fn set_meta_contexts(&mut self, export: &str, names: &[&str]) -> Result<(), NbdError> {
        let opt = proto::OPT_SET_META_CONTEXT;
        let req = proto::MetaContextRequest {
            export: export.to_string(),
            queries: names.iter().map(|s| s.to_string()).collect(),
        };
        self.send_option(opt, &req.encode())?;
        loop {
            let (typ, data) = self.option_reply(opt)?;
            match typ {
                proto::REP_ACK => break,
                proto::REP_META_CONTEXT => {
                    let mut cur = proto::Cursor::new(&data);
                    let id = cur.u32("context id")?;
                    let name = cur.string(cur.remaining(), "context name")?;
                    self.contexts.push((name, id));
                }
                proto::REP_ERR_UNSUP => {
                    return Err(NbdError::Negotiation(
                        "the server does not support metadata contexts (NBD_OPT_SET_META_CONTEXT)"
                            .into(),
                    ));
                }
                t => return Err(refused(opt, t, &data)),
            }
        }
        for name in names {
            if !self.contexts.iter().any(|c| c.0 == *name) {
                return Err(NbdError::Negotiation(missing_context(name, &self.contexts)));
            }
        }
        Ok(())
    }

    fn go(&mut self, export: &str, no_zeroes: bool) -> Result<(), NbdError> {
        let opt = proto::OPT_GO;
        let req = proto::InfoRequest {
            name: export.to_string(),
            requests: vec![proto::INFO_BLOCK_SIZE],
        };
        self.send_option(opt, &req.encode())?;
        let mut export_info = None;
        loop {
            let (typ, data) = self.option_reply(opt)?;
            match typ {
                proto::REP_ACK => break,
                proto::REP_INFO => {
                    let mut cur = proto::Cursor::new(&data);
                    match cur.u16("information type")? {
                        proto::INFO_EXPORT => {
                            let size = cur.u64("export size")?;
                            let flags = cur.u16("transmission flags")?;
                            export_info = Some((size, flags));
                        }
                        proto::INFO_BLOCK_SIZE => {
                            let _min = cur.u32("minimum block size")?;
                            let _preferred = cur.u32("preferred block size")?;
                            let max = cur.u32("maximum payload")?;
                            if max > 0 {
                                self.max_payload = max.min(proto::MAX_PAYLOAD);
                            }
                        }
                        // Names and descriptions are not needed.
                        _ => {}
                    }
                }
                proto::REP_ERR_UNSUP => return self.export_name(export, no_zeroes),
                proto::REP_ERR_UNKNOWN => {
                    return Err(NbdError::Negotiation(format!(
                        "the server has no export named {export:?}{}",
                        message_suffix(&data)
                    )));
                }
                t => return Err(refused(opt, t, &data)),
            }
        }
        let Some((size, flags)) = export_info else {
            return Err(NbdError::Protocol(
                "NBD_OPT_GO succeeded without NBD_INFO_EXPORT".into(),
            ));
        };
        self.size = size;
        self.flags = flags;
        Ok(())
    }

    /// The pre-`NBD_OPT_GO` way into transmission, for old servers.
    fn export_name(&mut self, export: &str, no_zeroes: bool) -> Result<(), NbdError> {
        self.send_option(proto::OPT_EXPORT_NAME, export.as_bytes())?;
        let closed = |e: io::Error| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                NbdError::Negotiation(format!(
                    "the server closed the connection: no export named {export:?}?"
                ))
            } else {
                NbdError::Io(e)
            }
        };
        self.size = read_u64(&mut self.io).map_err(closed)?;
        self.flags = read_u16(&mut self.io).map_err(closed)?;
        if !no_zeroes {
            let mut zeroes = [0u8; 124];
            self.io.read_exact(&mut zeroes)?;
        }
        Ok(())
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<(), NbdError> {
        let len = u32::try_from(data.len())
            .map_err(|_| NbdError::InvalidRequest("option data too long".into()))?;
        let mut b = proto::encode_option_header(option, len).to_vec();
        b.extend_from_slice(data);
        self.io.get_mut().write_all(&b)?;
        Ok(())
    }

    fn option_reply(&mut self, option: u32) -> Result<(u32, Vec<u8>), NbdError> {
        let mut h = [0u8; proto::OptionReplyHeader::LEN];
        self.io.read_exact(&mut h)?;
        let h = proto::OptionReplyHeader::decode(&h)?;
        if h.option != option {
            return Err(NbdError::Protocol(format!(
                "reply for {} while waiting for {}",
                proto::option_name(h.option),
                proto::option_name(option)
            )));
        }
        if h.len > MAX_OPTION_REPLY {
            return Err(NbdError::Protocol(format!(
                "{} reply to {} has {} bytes of data",
                proto::reply_type_name(h.typ),
                proto::option_name(option),
                h.len
            )));
        }
        let mut data = vec![0u8; h.len as usize];
        self.io.read_exact(&mut data)?;
        Ok((h.typ, data))
    }

    fn usable(&self) -> Result<(), NbdError> {
        match &self.broken {
            Some(b) => Err(NbdError::Broken(b.clone())),
            None => Ok(()),
        }
    }

    /// Runs one exchange; an I/O error or protocol violation marks the connection
    /// unusable, since the stream may be out of sync.
    fn guard<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, NbdError>,
    ) -> Result<T, NbdError> {
        let r = f(self);
        if let Err(e @ (NbdError::Io(_) | NbdError::Protocol(_) | NbdError::Malformed(_))) = &r {
            self.broken = Some(e.to_string());
        }
        r
    }

    fn send_request(
        &mut self,
        typ: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<u64, NbdError> {
        self.next_cookie = self.next_cookie.wrapping_add(1);
        let cookie = self.next_cookie;
        let hdr = Request {
            flags,
            typ,
            cookie,
            offset,
            len,
        }
        .encode();
        write_all_vectored(self.io.get_mut(), &hdr, payload)?;
        Ok(cookie)
    }

    fn reply_header(&mut self, cookie: u64) -> Result<proto::ReplyHeader, NbdError> {
        let magic = read_u32(&mut self.io)?;
        let h = match magic {
            proto::SIMPLE_REPLY_MAGIC => proto::ReplyHeader::Simple {
                error: read_u32(&mut self.io)?,
                cookie: read_u64(&mut self.io)?,
            },
            proto::STRUCTURED_REPLY_MAGIC => proto::ReplyHeader::Chunk {
                flags: read_u16(&mut self.io)?,
                typ: read_u16(&mut self.io)?,
                cookie: read_u64(&mut self.io)?,
                len: read_u32(&mut self.io)?,
            },
            m => {
                return Err(NbdError::Protocol(format!(
                    "reply magic is {m:#010x}, neither simple nor structured"
                )));
            }
        };
        let got = match h {
            proto::ReplyHeader::Simple { cookie, .. }
            | proto::ReplyHeader::Chunk { cookie, .. } => cookie,
        };
        if got != cookie {
            return Err(NbdError::Protocol(format!(
                "reply for cookie {got} while request {cookie} is the only one in flight"
            )));
        }
        if matches!(h, proto::ReplyHeader::Chunk { .. }) && !self.structured {
            return Err(NbdError::Protocol(
                "structured reply chunk although structured replies were not negotiated".into(),
            ));
        }
        Ok(h)
    }

    /// Reads the payload of an error chunk: the error and its message (with the
    /// offset appended for `NBD_REPLY_TYPE_ERROR_OFFSET`).
    fn error_chunk(&mut self, typ: u16, len: u32) -> Result<(Errno, String), NbdError> {
        if !(6..=MAX_ERROR_CHUNK).contains(&len) {
            return Err(NbdError::Protocol(format!(
                "error chunk of type {typ:#x} has length {len}"
            )));
        }
        let mut d = vec![0u8; len as usize];
        self.io.read_exact(&mut d)?;
        let mut cur = proto::Cursor::new(&d);
        let errno = cur.u32("error")?;
        let mlen = usize::from(cur.u16("message length")?);
        let msg = cur.take(mlen, "error message")?;
        let mut message = String::from_utf8_lossy(msg).into_owned();
        if typ == proto::REPLY_TYPE_ERROR_OFFSET {
            let at = cur.u64("error offset")?;
            message = format!("{message} (at offset {at})");
        } else if typ != proto::REPLY_TYPE_ERROR {
            message = format!("{message} (unknown error chunk type {typ:#x})");
        }
        // The error must be non-zero; a server that sends 0 still failed.
        let errno = if errno == 0 { Errno::EIO } else { Errno(errno) };
        Ok((errno, message))
    }

    fn read_one(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let len = buf.len() as u32;
        let what = || format!("READ of {len} bytes at offset {offset}");
        let cookie = self.send_request(proto::CMD_READ, 0, offset, len, &[])?;
        let mut covered: Vec<(u64, u64)> = Vec::new();
        let mut error = None;
        loop {
            match self.reply_header(cookie)? {
                proto::ReplyHeader::Simple { error: 0, .. } if self.structured => {
                    return Err(NbdError::Protocol(format!(
                        "simple reply to {} after structured replies were negotiated",
                        what()
                    )));
                }
                proto::ReplyHeader::Simple { error: 0, .. } => {
                    self.io.read_exact(buf)?;
                    return Ok(());
                }
                proto::ReplyHeader::Simple { error, .. } => {
                    return Err(NbdError::Server {
                        command: what(),
                        errno: Errno(error),
                        message: String::new(),
                    });
                }
                proto::ReplyHeader::Chunk {
                    flags,
                    typ,
                    len: clen,
                    ..
                } => {
                    match typ {
                        proto::REPLY_TYPE_OFFSET_DATA => {
                            if clen < 9 {
                                return Err(NbdError::Protocol(format!(
                                    "OFFSET_DATA chunk of length {clen} in reply to {}",
                                    what()
                                )));
                            }
                            let at = read_u64(&mut self.io)?;
                            let n = u64::from(clen - 8);
                            let rel = chunk_range(offset, u64::from(len), at, n)
                                .ok_or_else(|| outside(&what(), at, n))?;
                            self.io
                                .read_exact(&mut buf[rel as usize..(rel + n) as usize])?;
                            covered.push((rel, n));
                        }
                        proto::REPLY_TYPE_OFFSET_HOLE => {
                            if clen != 12 {
                                return Err(NbdError::Protocol(format!(
                                    "OFFSET_HOLE chunk of length {clen} in reply to {}",
                                    what()
                                )));
                            }
                            let at = read_u64(&mut self.io)?;
                            let n = u64::from(read_u32(&mut self.io)?);
                            let rel = chunk_range(offset, u64::from(len), at, n)
                                .filter(|_| n > 0)
                                .ok_or_else(|| outside(&what(), at, n))?;
                            buf[rel as usize..(rel + n) as usize].fill(0);
                            covered.push((rel, n));
                        }
                        proto::REPLY_TYPE_NONE => {
                            if clen != 0 || flags & proto::REPLY_FLAG_DONE == 0 {
                                return Err(NbdError::Protocol(format!(
                                    "malformed NONE chunk in reply to {}",
                                    what()
                                )));
                            }
                        }
                        t if t & proto::REPLY_TYPE_FLAG_ERROR != 0 => {
                            let e = self.error_chunk(t, clen)?;
                            error.get_or_insert(e);
                        }
                        t => {
                            return Err(NbdError::Protocol(format!(
                                "unexpected chunk type {t} in reply to {}",
                                what()
                            )));
                        }
                    }
                    if flags & proto::REPLY_FLAG_DONE != 0 {
                        break;
                    }
                }
            }
        }
        if let Some((errno, message)) = error {
            return Err(NbdError::Server {
                command: what(),
                errno,
                message,
            });
        }
        check_coverage(&mut covered, u64::from(len))
            .map_err(|e| NbdError::Protocol(format!("reply to {}: {e}", what())))
    }

    /// Waits for the reply to a command without reply data.
    fn read_ack(&mut self, cookie: u64, what: impl Fn() -> String) -> Result<(), NbdError> {
        let mut error = None;
        loop {
            match self.reply_header(cookie)? {
                proto::ReplyHeader::Simple { error: 0, .. } => return Ok(()),
                proto::ReplyHeader::Simple { error, .. } => {
                    return Err(NbdError::Server {
                        command: what(),
                        errno: Errno(error),
                        message: String::new(),
                    });
                }
                proto::ReplyHeader::Chunk {
                    flags, typ, len, ..
                } => {
                    match typ {
                        proto::REPLY_TYPE_NONE if len == 0 => {}
                        t if t & proto::REPLY_TYPE_FLAG_ERROR != 0 => {
                            let e = self.error_chunk(t, len)?;
                            error.get_or_insert(e);
                        }
                        t => {
                            return Err(NbdError::Protocol(format!(
                                "unexpected chunk type {t} (length {len}) in reply to {}",
                                what()
                            )));
                        }
                    }
                    if flags & proto::REPLY_FLAG_DONE != 0 {
                        break;
                    }
                }
            }
        }
        match error {
            Some((errno, message)) => Err(NbdError::Server {
                command: what(),
                errno,
                message,
            }),
            None => Ok(()),
        }
    }

    fn block_status_one(
        &mut self,
        offset: u64,
        len: u32,
        id: u32,
        context: &str,
    ) -> Result<Vec<(u64, u32)>, NbdError> {
        let what = || format!("BLOCK_STATUS of {len} bytes at offset {offset} in {context}");
        let cookie = self.send_request(proto::CMD_BLOCK_STATUS, 0, offset, len, &[])?;
        let mut extents: Option<Vec<(u64, u32)>> = None;
        let mut error = None;
        loop {
            match self.reply_header(cookie)? {
                proto::ReplyHeader::Simple { error: 0, .. } => {
                    return Err(NbdError::Protocol(format!(
                        "simple success reply to {}",
                        what()
                    )));
                }
                proto::ReplyHeader::Simple { error, .. } => {
                    return Err(NbdError::Server {
                        command: what(),
                        errno: Errno(error),
                        message: String::new(),
                    });
                }
                proto::ReplyHeader::Chunk {
                    flags,
                    typ,
                    len: clen,
                    ..
                } => {
                    match typ {
                        proto::REPLY_TYPE_BLOCK_STATUS => {
                            if clen < 12 || (clen - 4) % 8 != 0 || clen > MAX_BLOCK_STATUS_CHUNK {
                                return Err(NbdError::Protocol(format!(
                                    "BLOCK_STATUS chunk of length {clen} in reply to {}",
                                    what()
                                )));
                            }
                            let mut d = vec![0u8; clen as usize];
                            self.io.read_exact(&mut d)?;
                            let ctx = proto::be_u32(&d[0..4]);
                            let mut list = Vec::with_capacity((d.len() - 4) / 8);
                            for desc in d[4..].chunks_exact(8) {
                                let l = proto::be_u32(&desc[0..4]);
                                if l == 0 {
                                    return Err(NbdError::Protocol(format!(
                                        "zero-length extent in reply to {}",
                                        what()
                                    )));
                                }
                                list.push((u64::from(l), proto::be_u32(&desc[4..8])));
                            }
                            if ctx == id {
                                if extents.is_some() {
                                    return Err(NbdError::Protocol(format!(
                                        "two BLOCK_STATUS chunks for the same context in reply to {}",
                                        what()
                                    )));
                                }
                                extents = Some(list);
                            }
                        }
                        proto::REPLY_TYPE_NONE if clen == 0 => {}
                        t if t & proto::REPLY_TYPE_FLAG_ERROR != 0 => {
                            let e = self.error_chunk(t, clen)?;
                            error.get_or_insert(e);
                        }
                        t => {
                            return Err(NbdError::Protocol(format!(
                                "unexpected chunk type {t} (length {clen}) in reply to {}",
                                what()
                            )));
                        }
                    }
                    if flags & proto::REPLY_FLAG_DONE != 0 {
                        break;
                    }
                }
            }
        }
        if let Some((errno, message)) = error {
            return Err(NbdError::Server {
                command: what(),
                errno,
                message,
            });
        }
        let Some(list) = extents else {
            return Err(NbdError::Protocol(format!(
                "no extents for the context in reply to {}",
                what()
            )));
        };
        Ok(clip_extents(list, u64::from(len)))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // The protocol wants a soft disconnect; do it on a best-effort basis.
        if !self.disconnected && self.broken.is_none() {
            let hdr = Request {
                flags: 0,
                typ: proto::CMD_DISC,
                cookie: 0,
                offset: 0,
                len: 0,
            }
            .encode();
            let _ = self.io.get_mut().write_all(&hdr);
            let _ = self.io.get_ref().shutdown();
        }
    }
}

fn end_of(offset: u64, len: u64) -> Result<u64, NbdError> {
    offset.checked_add(len).ok_or_else(|| {
        NbdError::InvalidRequest(format!("offset {offset} + length {len} overflows"))
    })
}

/// Offset of a reply chunk `[at, at+n)` relative to the request `[offset,
/// offset+len)`, or `None` if it does not lie inside.
fn chunk_range(offset: u64, len: u64, at: u64, n: u64) -> Option<u64> {
    let rel = at.checked_sub(offset)?;
    (rel.checked_add(n)? <= len).then_some(rel)
}

fn outside(what: &str, at: u64, n: u64) -> NbdError {
    NbdError::Protocol(format!(
        "chunk of {n} bytes at offset {at} lies outside the request in reply to {what}"
    ))
}

/// Content chunks of a successful read must cover the request exactly once.
fn check_coverage(covered: &mut [(u64, u64)], len: u64) -> Result<(), CoverageError> {
    covered.sort_unstable();
    let mut pos = 0u64;
    for &(start, n) in covered.iter() {
        if start < pos {
            return Err(CoverageError::Overlap { at: start });
        }
        if start > pos {
            return Err(CoverageError::Gap {
                from: pos,
                to: start,
            });
        }
        pos = start + n;
    }
    if pos != len {
        return Err(CoverageError::Short { sent: pos, len });
    }
    Ok(())
}

/// How the content chunks of a read reply failed to cover the request exactly
/// once (offsets relative to the request).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum CoverageError {
    #[error("chunks overlap at {at}")]
    Overlap { at: u64 },
    #[error("bytes {from}..{to} were not sent")]
    Gap { from: u64, to: u64 },
    #[error("only {sent} of {len} bytes were sent")]
    Short { sent: u64, len: u64 },
}

/// Cuts extents to the requested length (a server may describe past it).
fn clip_extents(list: Vec<(u64, u32)>, len: u64) -> Vec<(u64, u32)> {
    let mut out = Vec::with_capacity(list.len());
    let mut pos = 0u64;
    for (l, flags) in list {
        if pos >= len {
            break;
        }
        let l = l.min(len - pos);
        pos += l;
        out.push((l, flags));
    }
    out
}

fn missing_context(name: &str, granted: &[(String, u32)]) -> String {
    let mut msg = format!("the server does not offer metadata context {name:?}");
    if let Some(bitmap) = name.strip_prefix("qemu:dirty-bitmap:") {
        msg.push_str(&format!(
            " (qemu-nbd does not export dirty bitmap {bitmap:?}: it must exist in the image \
             and qemu-nbd must be started with -B {bitmap})"
        ));
    }
    if !granted.is_empty() {
        let names: Vec<&str> = granted.iter().map(|c| c.0.as_str()).collect();
        msg.push_str(&format!("; granted: {}", names.join(", ")));
    }
    msg
}

fn refused(option: u32, typ: u32, data: &[u8]) -> NbdError {
    if typ & proto::REP_FLAG_ERROR == 0 {
        return NbdError::Protocol(format!(
            "unexpected {} ({typ}) in reply to {}",
            proto::reply_type_name(typ),
            proto::option_name(option)
        ));
    }
    NbdError::Negotiation(format!(
        "{} refused with {}{}",
        proto::option_name(option),
        proto::reply_type_name(typ),
        message_suffix(data)
    ))
}

fn message_suffix(data: &[u8]) -> String {
    if data.is_empty() {
        String::new()
    } else {
        format!(": {}", String::from_utf8_lossy(data))
    }
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn write_all_vectored(w: &mut impl Write, a: &[u8], b: &[u8]) -> io::Result<()> {
    let mut bufs = [IoSlice::new(a), IoSlice::new(b)];
    let mut slices: &mut [IoSlice<'_>] = &mut bufs;
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match w.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn chunk_range_bounds() {
        assert_eq!(chunk_range(100, 50, 100, 50), Some(0));
        assert_eq!(chunk_range(100, 50, 120, 30), Some(20));
        assert_eq!(chunk_range(100, 50, 120, 31), None);
        assert_eq!(chunk_range(100, 50, 99, 1), None);
        assert_eq!(chunk_range(100, 50, u64::MAX, 2), None);
    }

    #[test]
    fn coverage() {
        assert!(check_coverage(&mut [(10, 5), (0, 10)], 15).is_ok());
        assert!(
            check_coverage(&mut [(0, 10), (5, 10)], 15)
                .unwrap_err()
                .to_string()
                .contains("overlap")
        );
        assert!(
            check_coverage(&mut [(0, 5), (10, 5)], 15)
                .unwrap_err()
                .to_string()
                .contains("not sent")
        );
        assert!(
            check_coverage(&mut [(0, 5)], 15)
                .unwrap_err()
                .to_string()
                .contains("only 5")
        );
        assert!(check_coverage(&mut [], 0).is_ok());
    }

    #[test]
    fn clipping() {
        assert_eq!(
            clip_extents(vec![(10, 1), (100, 0)], 50),
            vec![(10, 1), (40, 0)]
        );
        assert_eq!(
            clip_extents(vec![(10, 1), (10, 0), (10, 1)], 15),
            vec![(10, 1), (5, 0)]
        );
        assert_eq!(clip_extents(vec![(10, 1)], 50), vec![(10, 1)]);
    }

    #[test]
    fn block_status_cap_is_aligned() {
        assert_eq!(MAX_BLOCK_STATUS_LEN % (512 * 1024), 0);
        assert!(MAX_BLOCK_STATUS_LEN <= u64::from(u32::MAX));
        assert!(MAX_BLOCK_STATUS_LEN > u64::from(u32::MAX) - 512 * 1024);
    }

    #[test]
    fn missing_bitmap_message() {
        let m = missing_context("qemu:dirty-bitmap:b0", &[("base:allocation".into(), 1)]);
        assert!(m.contains("does not export dirty bitmap \"b0\""), "{m}");
        assert!(m.contains("-B b0"), "{m}");
        assert!(m.contains("granted: base:allocation"), "{m}");
    }
}
