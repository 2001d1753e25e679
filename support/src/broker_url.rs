//! MQTT broker URLs as both daemons accept them: `mqtt://host[:port]` or
//! `mqtts://host[:port]`, with bracketed IPv6 literals (`mqtt://[::1]:1883`).

/// A parsed broker URL. `port` is `None` when the URL names none (see
/// [`BrokerUrl::port_or_default`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    pub host: String,
    pub port: Option<u16>,
}

/// Why a broker URL was refused (the message quotes the URL).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{url:?}: {reason}")]
pub struct BrokerUrlError {
    pub url: String,
    pub reason: String,
}

impl BrokerUrl {
    pub fn parse(s: &str) -> Result<Self, BrokerUrlError> {
        let err = |reason: String| BrokerUrlError {
            url: s.to_owned(),
            reason,
        };
        let (tls, rest) = if let Some(rest) = s.strip_prefix("mqtts://") {
            (true, rest)
        } else if let Some(rest) = s.strip_prefix("mqtt://") {
            (false, rest)
        } else {
            return Err(err(
                "not a broker URL (mqtt://host[:port] or mqtts://host[:port])".into(),
            ));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| err("unterminated '[' in host".into()))?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(err(format!("unexpected {after:?} after host"))),
            };
            (host.to_owned(), port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (rest.to_owned(), None),
            }
        };
        if host.is_empty() || host.contains('/') || host.contains('@') {
            return Err(err("missing or invalid host".into()));
        }
        let port = match port {
            Some(p) => Some(
                p.parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| err(format!("port {p:?} is not 1-65535")))?,
            ),
            None => None,
        };
        Ok(BrokerUrl { tls, host, port })
    }

    /// The URL's port, or MQTT's registered one (8883 with TLS, else 1883).
    pub fn port_or_default(&self) -> u16 {
        self.port.unwrap_or(if self.tls { 8883 } else { 1883 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_and_without_ports() {
        let u = BrokerUrl::parse("mqtts://broker.example:9000").unwrap();
        assert!(u.tls);
        assert_eq!((u.host.as_str(), u.port), ("broker.example", Some(9000)));
        let u = BrokerUrl::parse("mqtts://b").unwrap();
        assert_eq!((u.port, u.port_or_default()), (None, 8883));
        let u = BrokerUrl::parse("mqtt://[::1]:1883/").unwrap();
        assert_eq!((u.host.as_str(), u.port_or_default()), ("::1", 1883));
        assert_eq!(
            BrokerUrl::parse("mqtt://[::1]").unwrap().port_or_default(),
            1883
        );
    }

    #[test]
    fn bad_urls_are_refused_with_the_url_quoted() {
        for bad in [
            "tcp://a:1",
            "mqtt://",
            "mqtt://a:0",
            "mqtt://a:70000",
            "mqtt://u@a:1",
            "mqtt://[::1",
            "mqtt://[::1]x",
        ] {
            let e = BrokerUrl::parse(bad).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
    }
}
