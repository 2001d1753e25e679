//! A small, bounded reader for pcap and pcapng capture files.
//!
//! Both formats, both byte orders, microsecond and nanosecond pcap, pcapng
//! `if_tsresol`. Reading is bounded: a record or block larger than
//! [`MAX_RECORD`] is an error, the reader keeps one reusable buffer, and no
//! length field is trusted before it is checked, so garbage is an error,
//! never a panic or a huge allocation.

use super::{LinkType, Timestamp};
use std::io::{self, Read};
use std::path::Path;

/// Largest record (pcap) or block (pcapng) accepted, bytes.
pub const MAX_RECORD: usize = 256 * 1024;
/// At most this many pcapng interfaces are remembered.
const MAX_INTERFACES: usize = 256;

/// Why a capture file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PcapError {
    #[error("reading {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{path}: not a pcap or pcapng file (magic {magic:#010x})")]
    BadMagic { path: String, magic: u32 },
    #[error("{path}: record at byte {offset} is truncated")]
    Truncated { path: String, offset: u64 },
    #[error("{path}: record at byte {offset} claims {len} bytes (limit {MAX_RECORD})")]
    TooLarge { path: String, offset: u64, len: u64 },
    #[error("{path}: bad block at byte {offset}: {what}")]
    BadBlock {
        path: String,
        offset: u64,
        what: &'static str,
    },
}

/// One frame read from a file.
#[derive(Debug, Clone, Copy)]
pub struct FileFrame<'a> {
    pub ts: Timestamp,
    pub link: LinkType,
    /// Captured bytes (`caplen`).
    pub data: &'a [u8],
    /// Original length on the wire.
    pub orig_len: u32,
}

#[derive(Debug, Clone, Copy)]
struct Iface {
    link: Option<LinkType>,
    /// Timestamp units per second.
    units_per_sec: u64,
}

#[derive(Debug)]
enum Format {
    Pcap {
        big_endian: bool,
        nanos: bool,
        link: Option<LinkType>,
    },
    Pcapng {
        big_endian: bool,
        ifaces: Vec<Iface>,
    },
}

/// Reads frames one by one from a pcap or pcapng stream.
#[derive(Debug)]
pub struct CaptureReader<R> {
    src: R,
    path: String,
    format: Format,
    buf: Vec<u8>,
    offset: u64,
    /// Frames skipped because their link type is not supported.
    pub unsupported_link: u64,
}

impl CaptureReader<io::BufReader<std::fs::File>> {
    /// Open a capture file; the format is detected from its magic number.
    pub fn open(path: &Path) -> Result<Self, PcapError> {
        let name = path.display().to_string();
        let f = std::fs::File::open(path).map_err(|source| PcapError::Io {
            path: name.clone(),
            source,
        })?;
        Self::new(io::BufReader::with_capacity(256 * 1024, f), name)
    }
}

fn u32_at(b: &[u8], at: usize, big: bool) -> u32 {
    let s = [b[at], b[at + 1], b[at + 2], b[at + 3]];
    if big {
        u32::from_be_bytes(s)
    } else {
        u32::from_le_bytes(s)
    }
}

fn u16_at(b: &[u8], at: usize, big: bool) -> u16 {
    let s = [b[at], b[at + 1]];
    if big {
        u16::from_be_bytes(s)
    } else {
        u16::from_le_bytes(s)
    }
}

impl<R: Read> CaptureReader<R> {
    /// Start reading `src`; `path` only names the source in errors.
    pub fn new(mut src: R, path: String) -> Result<Self, PcapError> {
        let mut head = [0u8; 24];
        read_exact_or(&mut src, &mut head[..4], &path, 0)?;
        let magic = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let format = match magic {
            0xa1b2_c3d4 | 0xd4c3_b2a1 | 0xa1b2_3c4d | 0x4d3c_b2a1 => {
                read_exact_or(&mut src, &mut head[4..24], &path, 4)?;
                let big = matches!(magic, 0xd4c3_b2a1 | 0x4d3c_b2a1);
                let nanos = matches!(magic, 0xa1b2_3c4d | 0x4d3c_b2a1);
                let link = LinkType::from_linktype(u32_at(&head, 20, big) & 0x0fff_ffff);
                Format::Pcap {
                    big_endian: big,
                    nanos,
                    link,
                }
            }
            0x0a0d_0d0a => Format::Pcapng {
                big_endian: false,
                ifaces: Vec::new(),
            },
            magic => return Err(PcapError::BadMagic { path, magic }),
        };
        let mut r = CaptureReader {
            src,
            path,
            format,
            buf: Vec::with_capacity(64 * 1024),
            offset: 0,
            unsupported_link: 0,
        };
        if let Format::Pcap { .. } = r.format {
            r.offset = 24;
        } else {
            // Re-read the section header block as a normal block.
            r.read_block(Some(head[..4].try_into().unwrap_or([0; 4])))?;
        }
        Ok(r)
    }

    /// The next frame, `Ok(None)` at a clean end of file.
    pub fn next_frame(&mut self) -> Result<Option<FileFrame<'_>>, PcapError> {
        loop {
            match &self.format {
                Format::Pcap {
                    big_endian,
                    nanos,
                    link,
                } => {
                    let (big, nanos, link) = (*big_endian, *nanos, *link);
                    let mut h = [0u8; 16];
                    if !self.read_or_eof(&mut h)? {
                        return Ok(None);
                    }
                    let caplen = u32_at(&h, 8, big) as usize;
                    let orig = u32_at(&h, 12, big);
                    if caplen > MAX_RECORD {
                        return Err(PcapError::TooLarge {
                            path: self.path.clone(),
                            offset: self.offset,
                            len: caplen as u64,
                        });
                    }
                    let start = self.offset;
                    self.buf.resize(caplen, 0);
                    read_exact_or(&mut self.src, &mut self.buf, &self.path, start + 16)?;
                    self.offset += 16 + caplen as u64;
                    let secs = u64::from(u32_at(&h, 0, big));
                    let frac = u64::from(u32_at(&h, 4, big));
                    let ns = secs * 1_000_000_000
                        + if nanos {
                            frac.min(999_999_999)
                        } else {
                            frac.min(999_999) * 1000
                        };
                    let Some(link) = link else {
                        self.unsupported_link += 1;
                        continue;
                    };
                    return Ok(Some(FileFrame {
                        ts: Timestamp::from_nanos(ns),
                        link,
                        data: &self.buf,
                        orig_len: orig,
                    }));
                }
                Format::Pcapng { .. } => match self.read_block(None)? {
                    None => return Ok(None),
                    Some(Some(f)) => {
                        let FrameAt {
                            ts,
                            link,
                            start,
                            len,
                            orig,
                        } = f;
                        return Ok(Some(FileFrame {
                            ts,
                            link,
                            data: &self.buf[start..start + len],
                            orig_len: orig,
                        }));
                    }
                    Some(None) => continue,
                },
            }
        }
    }

    fn read_or_eof(&mut self, buf: &mut [u8]) -> Result<bool, PcapError> {
        let mut got = 0;
        while got < buf.len() {
            match self.src.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => {
                    return Err(PcapError::Truncated {
                        path: self.path.clone(),
                        offset: self.offset,
                    })
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(PcapError::Io {
                        path: self.path.clone(),
                        source,
                    })
                }
            }
        }
        Ok(true)
    }

    /// Read one pcapng block. `Ok(None)` at EOF, `Ok(Some(None))` for a block
    /// that is not a frame, `Ok(Some(Some(frame)))` for a packet block.
    fn read_block(
        &mut self,
        first4: Option<[u8; 4]>,
    ) -> Result<Option<Option<FrameAt>>, PcapError> {
        let mut h = [0u8; 8];
        match first4 {
            Some(f) => {
                h[..4].copy_from_slice(&f);
                read_exact_or(&mut self.src, &mut h[4..], &self.path, self.offset + 4)?;
            }
            None => {
                if !self.read_or_eof(&mut h)? {
                    return Ok(None);
                }
            }
        }
        let start = self.offset;
        let btype_le = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        if btype_le == 0x0a0d_0d0a {
            // Section header: its byte-order magic decides the endianness of the section.
            let mut bom = [0u8; 4];
            read_exact_or(&mut self.src, &mut bom, &self.path, start + 8)?;
            let big = match u32::from_le_bytes(bom) {
                0x1a2b_3c4d => false,
                0x4d3c_2b1a => true,
                _ => {
                    return Err(PcapError::BadBlock {
                        path: self.path.clone(),
                        offset: start,
                        what: "byte-order magic",
                    })
                }
            };
            let len = u32_at(&h, 4, big) as usize;
            self.check_len(len, 28, start)?;
            self.skip_exact(len - 12, start + 12)?;
            self.offset = start + len as u64;
            self.format = Format::Pcapng {
                big_endian: big,
                ifaces: Vec::new(),
            };
            return Ok(Some(None));
        }
        let Format::Pcapng { big_endian, .. } = self.format else {
            return Ok(Some(None));
        };
        let big = big_endian;
        let btype = u32_at(&h, 0, big);
        let len = u32_at(&h, 4, big) as usize;
        self.check_len(len, 12, start)?;
        let body = len - 12;
        self.buf.resize(body + 4, 0);
        read_exact_or(&mut self.src, &mut self.buf, &self.path, start + 8)?;
        self.offset = start + len as u64;
        let trailer = u32_at(&self.buf, body, big) as usize;
        if trailer != len {
            return Err(PcapError::BadBlock {
                path: self.path.clone(),
                offset: start,
                what: "trailing length differs",
            });
        }
        let b = &self.buf[..body];
        let bad = |what| PcapError::BadBlock {
            path: self.path.clone(),
            offset: start,
            what,
        };
        match btype {
            1 => {
                if b.len() < 8 {
                    return Err(bad("short interface description"));
                }
                let link = LinkType::from_linktype(u32::from(u16_at(b, 0, big)));
                let mut units = 1_000_000u64;
                let mut o = 8;
                while o + 4 <= b.len() {
                    let code = u16_at(b, o, big);
                    let olen = usize::from(u16_at(b, o + 2, big));
                    if code == 0 {
                        break;
                    }
                    if code == 9 && olen >= 1 && o + 4 < b.len() {
                        let v = b[o + 4];
                        let exp = u32::from(v & 0x7f);
                        units = if v & 0x80 == 0 {
                            10u64.checked_pow(exp).unwrap_or(0)
                        } else {
                            1u64.checked_shl(exp).unwrap_or(0)
                        };
                        if units == 0 {
                            return Err(bad("if_tsresol out of range"));
                        }
                    }
                    o += 4 + olen.div_ceil(4) * 4;
                }
                if let Format::Pcapng { ifaces, .. } = &mut self.format {
                    if ifaces.len() >= MAX_INTERFACES {
                        return Err(bad("too many interfaces"));
                    }
                    ifaces.push(Iface {
                        link,
                        units_per_sec: units,
                    });
                }
                Ok(Some(None))
            }
            6 => {
                if b.len() < 20 {
                    return Err(bad("short enhanced packet block"));
                }
                let ifid = u32_at(b, 0, big) as usize;
                let ts = (u64::from(u32_at(b, 4, big)) << 32) | u64::from(u32_at(b, 8, big));
                let caplen = u32_at(b, 12, big) as usize;
                let orig = u32_at(b, 16, big);
                if caplen > b.len() - 20 {
                    return Err(bad("captured length beyond block"));
                }
                let Format::Pcapng { ifaces, .. } = &self.format else {
                    return Ok(Some(None));
                };
                let iface = *ifaces
                    .get(ifid)
                    .ok_or_else(|| bad("unknown interface id"))?;
                let Some(link) = iface.link else {
                    self.unsupported_link += 1;
                    return Ok(Some(None));
                };
                let ns = to_nanos(ts, iface.units_per_sec);
                Ok(Some(Some(FrameAt {
                    ts: Timestamp::from_nanos(ns),
                    link,
                    start: 20,
                    len: caplen,
                    orig,
                })))
            }
            3 => {
                // Simple packet block: no timestamp, interface 0.
                if b.len() < 4 {
                    return Err(bad("short simple packet block"));
                }
                let orig = u32_at(b, 0, big);
                let caplen = (orig as usize).min(b.len() - 4);
                let Format::Pcapng { ifaces, .. } = &self.format else {
                    return Ok(Some(None));
                };
                let iface = *ifaces.first().ok_or_else(|| bad("no interface"))?;
                let Some(link) = iface.link else {
                    self.unsupported_link += 1;
                    return Ok(Some(None));
                };
                Ok(Some(Some(FrameAt {
                    ts: Timestamp::from_nanos(0),
                    link,
                    start: 4,
                    len: caplen,
                    orig,
                })))
            }
            _ => Ok(Some(None)),
        }
    }

    fn check_len(&self, len: usize, min: usize, offset: u64) -> Result<(), PcapError> {
        if len > MAX_RECORD + 64 {
            return Err(PcapError::TooLarge {
                path: self.path.clone(),
                offset,
                len: len as u64,
            });
        }
        if len < min || len % 4 != 0 {
            return Err(PcapError::BadBlock {
                path: self.path.clone(),
                offset,
                what: "block length",
            });
        }
        Ok(())
    }

    fn skip_exact(&mut self, n: usize, offset: u64) -> Result<(), PcapError> {
        self.buf.resize(n, 0);
        read_exact_or(&mut self.src, &mut self.buf, &self.path, offset)
    }
}

#[derive(Debug, Clone, Copy)]
struct FrameAt {
    ts: Timestamp,
    link: LinkType,
    start: usize,
    len: usize,
    orig: u32,
}

fn to_nanos(ts: u64, units_per_sec: u64) -> u64 {
    let secs = ts / units_per_sec;
    let frac = ts % units_per_sec;
    let frac_ns = (u128::from(frac) * 1_000_000_000 / u128::from(units_per_sec)) as u64;
    secs.saturating_mul(1_000_000_000).saturating_add(frac_ns)
}

fn read_exact_or<R: Read>(
    src: &mut R,
    buf: &mut [u8],
    path: &str,
    offset: u64,
) -> Result<(), PcapError> {
    src.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            PcapError::Truncated {
                path: path.to_string(),
                offset,
            }
        } else {
            PcapError::Io {
                path: path.to_string(),
                source: e,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut x: u32 = 99;
        for n in 0..2000usize {
            let mut v = vec![0u8; n % 300];
            for b in v.iter_mut() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x as u8;
            }
            // Valid magics followed by garbage reach the record parsers.
            let magics: [&[u8]; 3] = [&[0xd4, 0xc3, 0xb2, 0xa1], &[0x0a, 0x0d, 0x0d, 0x0a], &[]];
            let mut data = magics[n % 3].to_vec();
            if n % 3 == 1 && v.len() > 8 {
                v[4..8].copy_from_slice(&[0x4d, 0x3c, 0x2b, 0x1a]);
            }
            data.extend_from_slice(&v);
            if let Ok(mut r) = CaptureReader::new(&data[..], "garbage".into()) {
                for _ in 0..100 {
                    match r.next_frame() {
                        Ok(Some(_)) => {}
                        _ => break,
                    }
                }
            }
        }
    }

    #[test]
    fn tsresol() {
        assert_eq!(to_nanos(1_500_000, 1_000_000), 1_500_000_000);
        assert_eq!(to_nanos(3, 1 << 1), 1_500_000_000);
    }
}
