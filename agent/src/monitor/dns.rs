//! Bounded DNS response parsing: the question name and the A/AAAA addresses
//! of the answers, so that later flows to those addresses inherit the name.
//! Compression pointers are followed a bounded number of times; the name is
//! written into a fixed buffer; no allocation.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Most addresses taken from one response.
pub const MAX_ADDRS: usize = 16;
const MAX_NAME: usize = 253;
const MAX_JUMPS: usize = 16;

/// The useful part of one DNS response.
#[derive(Debug, Clone)]
pub struct DnsAnswer {
    name: [u8; MAX_NAME],
    name_len: usize,
    addrs: [IpAddr; MAX_ADDRS],
    n_addrs: usize,
    /// Smallest TTL of the address records, seconds.
    pub ttl: u32,
}

impl DnsAnswer {
    /// The queried name, lower case, without the trailing dot.
    pub fn name(&self) -> &str {
        std::str::from_utf8(&self.name[..self.name_len]).unwrap_or("")
    }

    /// Addresses from the A and AAAA answer records.
    pub fn addrs(&self) -> &[IpAddr] {
        &self.addrs[..self.n_addrs]
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Read a (possibly compressed) name at `at`; returns the offset after it in
/// the original position. Writes the dotted lower-case name into `out`.
fn read_name(
    msg: &[u8],
    mut at: usize,
    out: &mut [u8; MAX_NAME],
    out_len: &mut usize,
) -> Option<usize> {
    let mut end = None;
    let mut jumps = 0;
    *out_len = 0;
    loop {
        let len = *msg.get(at)?;
        match len & 0xc0 {
            0xc0 => {
                let ptr = usize::from(be16(msg, at)? & 0x3fff);
                if end.is_none() {
                    end = Some(at + 2);
                }
                jumps += 1;
                if jumps > MAX_JUMPS || ptr >= msg.len() {
                    return None;
                }
                at = ptr;
            }
            0x00 => {
                if len == 0 {
                    return Some(end.unwrap_or(at + 1));
                }
                let label = msg.get(at + 1..at + 1 + usize::from(len))?;
                let need = usize::from(len) + usize::from(*out_len > 0);
                if *out_len + need > MAX_NAME {
                    return None;
                }
                if *out_len > 0 {
                    out[*out_len] = b'.';
                    *out_len += 1;
                }
                for &c in label {
                    out[*out_len] = c.to_ascii_lowercase();
                    *out_len += 1;
                }
                at += 1 + usize::from(len);
            }
            _ => return None,
        }
    }
}

/// Parse a DNS response (UDP payload). `None` for queries, errors, or garbage.
pub fn parse_response(msg: &[u8]) -> Option<DnsAnswer> {
    let flags = be16(msg, 2)?;
    let is_response = flags & 0x8000 != 0;
    let rcode = flags & 0x000f;
    if !is_response || rcode != 0 {
        return None;
    }
    let qd = be16(msg, 4)?;
    let an = be16(msg, 6)?;
    if qd != 1 || an == 0 {
        return None;
    }
    let mut ans = DnsAnswer {
        name: [0; MAX_NAME],
        name_len: 0,
        addrs: [IpAddr::V4(Ipv4Addr::UNSPECIFIED); MAX_ADDRS],
        n_addrs: 0,
        ttl: u32::MAX,
    };
    let mut at = read_name(msg, 12, &mut ans.name, &mut ans.name_len)?;
    at += 4; // qtype, qclass
    let mut scratch = [0u8; MAX_NAME];
    let mut scratch_len = 0;
    for _ in 0..an.min(64) {
        at = read_name(msg, at, &mut scratch, &mut scratch_len)?;
        let rtype = be16(msg, at)?;
        let ttl = u32::from_be_bytes(msg.get(at + 4..at + 8)?.try_into().ok()?);
        let rdlen = usize::from(be16(msg, at + 8)?);
        let rdata = msg.get(at + 10..at + 10 + rdlen)?;
        at += 10 + rdlen;
        let addr = match (rtype, rdlen) {
            (1, 4) => IpAddr::V4(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3])),
            (28, 16) => {
                let mut a = [0u8; 16];
                a.copy_from_slice(rdata);
                IpAddr::V6(Ipv6Addr::from(a))
            }
            _ => continue,
        };
        if ans.n_addrs < MAX_ADDRS {
            ans.addrs[ans.n_addrs] = addr;
            ans.n_addrs += 1;
            ans.ttl = ans.ttl.min(ttl);
        }
    }
    (ans.n_addrs > 0 && ans.name_len > 0).then_some(ans)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_answer() {
        let mut m = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 2, 0, 0, 0, 0];
        m.extend_from_slice(b"\x03WWW\x04bank\x07example\x00\x00\x01\x00\x01");
        // CNAME answer pointing at the question, then an A record for it.
        m.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 2, 0xc0, 12]);
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 192, 0, 2, 7]);
        let a = parse_response(&m).expect("parsed");
        assert_eq!(a.name(), "www.bank.example");
        assert_eq!(a.addrs(), &[IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))]);
        assert_eq!(a.ttl, 30);
        // A pointer loop is rejected, not followed forever.
        let mut l = m.clone();
        l[12] = 0xc0;
        l[13] = 12;
        assert!(parse_response(&l).is_none());
        for cut in 0..m.len() {
            let _ = parse_response(&m[..cut]);
        }
    }
}
