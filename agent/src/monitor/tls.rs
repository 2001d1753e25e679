//! Bounded parsing of a TLS ClientHello for its `server_name` (SNI).
//! Only the captured bytes of one segment are looked at; a ClientHello split
//! over several segments whose SNI lies beyond the first is not recognised.

fn be16(b: &[u8], at: usize) -> Option<usize> {
    Some(usize::from(u16::from_be_bytes([
        *b.get(at)?,
        *b.get(at + 1)?,
    ])))
}

/// The SNI host name of a ClientHello record at the start of `payload`, if any.
pub fn client_hello_sni(payload: &[u8]) -> Option<&str> {
    // TLS record: handshake (22), version 3.x.
    if payload.len() < 9 || payload[0] != 22 || payload[1] != 3 {
        return None;
    }
    handshake_sni(&payload[5..])
}

/// The SNI of a ClientHello handshake message (no record header: QUIC
/// carries the handshake in CRYPTO frames) at the start of `payload`.
pub fn handshake_sni(payload: &[u8]) -> Option<&str> {
    if payload.first() != Some(&1) {
        return None;
    }
    let mut at = 4; // handshake type + 3-byte length
    at += 2 + 32; // client version + random
    let sid = usize::from(*payload.get(at)?);
    at += 1 + sid;
    let suites = be16(payload, at)?;
    at += 2 + suites;
    let comp = usize::from(*payload.get(at)?);
    at += 1 + comp;
    let ext_total = be16(payload, at)?;
    at += 2;
    let ext_end = (at + ext_total).min(payload.len());
    while at + 4 <= ext_end {
        let etype = be16(payload, at)?;
        let elen = be16(payload, at + 2)?;
        at += 4;
        if etype == 0 {
            // server_name_list: list length, then (type, length, name) entries.
            let list = payload.get(at..at + elen)?;
            let mut i = 2;
            while i + 3 <= list.len() {
                let ntype = list[i];
                let nlen = be16(list, i + 1)?;
                let name = list.get(i + 3..i + 3 + nlen)?;
                if ntype == 0 {
                    let valid = !name.is_empty()
                        && name.len() <= 253
                        && name
                            .iter()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_'));
                    return if valid {
                        std::str::from_utf8(name).ok()
                    } else {
                        None
                    };
                }
                i += 3 + nlen;
            }
            return None;
        }
        at += elen;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    use xtask::kit::pcap::client_hello as hello;

    #[test]
    fn sni_found_and_truncation_safe() {
        let h = hello("online.bank.example");
        assert_eq!(client_hello_sni(&h), Some("online.bank.example"));
        for cut in 0..h.len() {
            assert_eq!(client_hello_sni(&h[..cut]), None, "cut at {cut}");
        }
    }
}
