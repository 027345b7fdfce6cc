//! Which `Host` names and `Origin`s the HTTP listener accepts: parsing and matching, no I/O.
//!
//! A host is accepted when it is an IP literal, `localhost`, or a name the operator listed
//! (`--http-allow-host`): an attacker's DNS name that resolves to the broker (DNS rebinding)
//! is none of these. An origin is accepted when it is the listener's own (its scheme, `http://`
//! or with `--http-tls` `https://`, and the request's `Host`) or one the operator listed
//! (`--http-allow-origin`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest host name (RFC 1035), so a huge header is refused before it is looked at further.
const MAX_NAME_BYTES: usize = 253;

/// The host part of a `Host` header or of an origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostName {
    /// An IPv4 literal, or an IPv6 literal written in brackets.
    Ip(IpAddr),
    /// A DNS name, lowercase, without a trailing dot.
    Name(String),
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostName::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            HostName::Ip(ip) => write!(f, "{ip}"),
            HostName::Name(name) => f.write_str(name),
        }
    }
}

/// A parsed `Host` header: `host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Host {
    /// The name or address.
    pub(crate) name: HostName,
    /// The port, when the header gives one.
    pub(crate) port: Option<u16>,
}

impl Host {
    /// Parses `name`, `name:port`, `1.2.3.4[:port]` or `[::1][:port]`; `None` for anything else
    /// (user info, an empty port, characters no host name has).
    pub(crate) fn parse(text: &str) -> Option<Host> {
        if let Some(rest) = text.strip_prefix('[') {
            let (inside, after) = rest.split_once(']')?;
            let ip: Ipv6Addr = inside.parse().ok()?;
            let port = match after {
                "" => None,
                _ => Some(parse_port(after.strip_prefix(':')?)?),
            };
            return Some(Host { name: HostName::Ip(IpAddr::V6(ip)), port });
        }
        let (name, port) = match text.split_once(':') {
            Some((name, port)) => (name, Some(parse_port(port)?)),
            None => (text, None),
        };
        let name = match name.parse::<Ipv4Addr>() {
            Ok(ip) => HostName::Ip(IpAddr::V4(ip)),
            Err(_) => HostName::Name(parse_name(name)?),
        };
        Some(Host { name, port })
    }

    /// This host as the origin of a page the listener served over `scheme`, same port.
    pub(crate) fn origin(&self, scheme: Scheme) -> Origin {
        let (name, default_port) = match scheme {
            Scheme::Http => ("http", 80),
            Scheme::Https => ("https", 443),
        };
        Origin { scheme: name.into(), host: self.name.clone(), port: self.port.or(Some(default_port)) }
    }
}

/// What the HTTP listener speaks: the scheme of its own origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scheme {
    /// Plain HTTP, the default.
    Http,
    /// HTTP inside TLS (`--http-tls`).
    Https,
}

/// A web origin: scheme, host and port, as browsers send it in the `Origin` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    scheme: String,
    host: HostName,
    /// The port, the scheme's default when the origin names none (`None` for a scheme without
    /// one).
    port: Option<u16>,
}

impl Origin {
    /// Parses `scheme://host[:port]` (no path, no user info); `None` for anything else,
    /// `null` included.
    pub(crate) fn parse(text: &str) -> Option<Origin> {
        let (scheme, authority) = text.split_once("://")?;
        let valid_scheme = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
        if !valid_scheme {
            return None;
        }
        let scheme = scheme.to_ascii_lowercase();
        let host = Host::parse(authority)?;
        let default_port = match scheme.as_str() {
            "http" => Some(80),
            "https" => Some(443),
            _ => None,
        };
        Some(Origin { scheme, host: host.name, port: host.port.or(default_port) })
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.host)?;
        let default = matches!((self.scheme.as_str(), self.port), ("http", Some(80)) | ("https", Some(443)));
        match self.port {
            Some(port) if !default => write!(f, ":{port}"),
            _ => Ok(()),
        }
    }
}

/// The host names and origins the operator allowed, on top of the ones always allowed.
#[derive(Debug, Clone, Default)]
pub(crate) struct Allowed {
    hosts: Vec<String>,
    origins: Vec<Origin>,
}

impl Allowed {
    /// Reads the `--http-allow-host` names and `--http-allow-origin` origins; an entry that is
    /// not one is an error naming it, for a one-line startup error.
    pub(crate) fn new(hosts: &[String], origins: &[String]) -> Result<Allowed, String> {
        let hosts = hosts.iter().map(|text| allowed_host(text)).collect::<Result<_, _>>()?;
        let origins = origins.iter().map(|text| allowed_origin(text)).collect::<Result<_, _>>()?;
        Ok(Allowed { hosts, origins })
    }

    /// True for an IP literal, `localhost` and the listed names.
    pub(crate) fn host(&self, host: &Host) -> bool {
        match &host.name {
            HostName::Ip(_) => true,
            HostName::Name(name) => name == "localhost" || self.hosts.contains(name),
        }
    }

    /// True for `own` (the origin of the listener as the request reached it) and the listed
    /// origins.
    pub(crate) fn origin(&self, origin: &Origin, own: Option<&Origin>) -> bool {
        own == Some(origin) || self.origins.contains(origin)
    }
}

/// One `--http-allow-host` entry: a name without a port.
fn allowed_host(text: &str) -> Result<String, String> {
    let what = "allowed host (--http-allow-host, http_allow_hosts)";
    match Host::parse(text) {
        Some(Host { name: HostName::Name(name), port: None }) => Ok(name),
        Some(Host { name: HostName::Name(_), port: Some(_) }) => {
            Err(format!("{what} '{text}': give the name without a port (every port is accepted)"))
        }
        Some(Host { name: HostName::Ip(_), .. }) => {
            Err(format!("{what} '{text}': IP addresses are always allowed; list names only"))
        }
        None => Err(format!("{what} '{text}' is not a host name")),
    }
}

/// One `--http-allow-origin` entry: `scheme://host[:port]`, not `null` nor `*`.
fn allowed_origin(text: &str) -> Result<Origin, String> {
    let what = "allowed origin (--http-allow-origin, http_allow_origins)";
    // An origin copied from the address bar may keep its slash.
    let trimmed = text.strip_suffix('/').unwrap_or(text);
    if trimmed.eq_ignore_ascii_case("null") || trimmed == "*" {
        return Err(format!(
            "{what} '{text}' would let any page in; list origins like https://ops.example.com"
        ));
    }
    Origin::parse(trimmed).ok_or_else(|| {
        format!("{what} '{text}' is not an origin: write scheme://host[:port], e.g. https://ops.example.com")
    })
}

/// A port: 1 to 5 digits, at most 65535.
fn parse_port(text: &str) -> Option<u16> {
    let digits = !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit());
    digits.then(|| text.parse().ok()).flatten()
}

/// A DNS name: letters, digits, `-`, `_` and dots; lowercase, one trailing dot dropped.
fn parse_name(text: &str) -> Option<String> {
    let name = text.strip_suffix('.').unwrap_or(text);
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !name.split('.').any(str::is_empty);
    valid.then(|| name.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(text: &str) -> Host {
        Host::parse(text).unwrap_or_else(|| panic!("{text:?} should parse"))
    }

    fn origin(text: &str) -> Origin {
        Origin::parse(text).unwrap_or_else(|| panic!("{text:?} should parse"))
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn hosts_parse_names_addresses_and_ports() {
        assert_eq!(
            host("127.0.0.1:15680"),
            Host { name: HostName::Ip([127, 0, 0, 1].into()), port: Some(15680) }
        );
        assert_eq!(host("[::1]:80").name, HostName::Ip(Ipv6Addr::LOCALHOST.into()));
        assert_eq!(host("[::1]").port, None);
        assert_eq!(host("Hopper.Internal.").name, HostName::Name("hopper.internal".into()));
        assert_eq!(host("localhost:0").port, Some(0));
        for bad in [
            "",
            ":80",
            "host:",
            "host:65536",
            "host:8x",
            "a@127.0.0.1",
            "::1",
            "[::1",
            "[::1]x",
            "[::1]:",
            "[nope]",
            "a..b",
            "evil.example/x",
            "a b",
            "caf\u{e9}",
            "1.2.3.4:5:6",
        ] {
            assert_eq!(Host::parse(bad), None, "{bad:?}");
        }
        // Not an IPv4 literal as Rust reads it: a name, allowed only when listed.
        assert_eq!(host("127.1").name, HostName::Name("127.1".into()));
    }

    #[test]
    fn origins_compare_with_default_ports_and_any_case() {
        assert_eq!(origin("HTTP://LocalHost"), origin("http://localhost:80"));
        assert_eq!(origin("https://ops.example.com"), origin("https://ops.example.com:443"));
        assert_ne!(origin("https://ops.example.com"), origin("http://ops.example.com"));
        assert_eq!(origin("http://[::1]:8080").to_string(), "http://[::1]:8080");
        assert_eq!(origin("https://a.example:443").to_string(), "https://a.example");
        assert_eq!(host("127.0.0.1:15680").origin(Scheme::Http), origin("http://127.0.0.1:15680"));
        assert_eq!(host("hopper.internal").origin(Scheme::Http), origin("http://hopper.internal"));
        assert_eq!(host("127.0.0.1:15680").origin(Scheme::Https), origin("https://127.0.0.1:15680"));
        assert_eq!(host("hopper.internal").origin(Scheme::Https), origin("https://hopper.internal:443"));
        assert_ne!(host("hopper.internal").origin(Scheme::Https), origin("https://hopper.internal:80"));
        for bad in
            ["null", "", "http://", "http://a.example/", "http://u@a.example", "1http://a", "//a.example"]
        {
            assert_eq!(Origin::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn only_addresses_localhost_and_listed_names_are_allowed_hosts() {
        let allowed = Allowed::new(&strings(&["Hopper.Internal"]), &[]).unwrap();
        for ok in
            ["127.0.0.1", "10.1.2.3:9", "[::1]:15680", "localhost:15680", "LOCALHOST", "hopper.internal:1"]
        {
            assert!(allowed.host(&host(ok)), "{ok}");
        }
        for refused in ["evil.example", "localhost.evil.example", "127.0.0.1.nip.io", "internal"] {
            assert!(!allowed.host(&host(refused)), "{refused}");
        }
        assert!(!Allowed::default().host(&host("hopper.internal")));
    }

    #[test]
    fn own_and_listed_origins_are_allowed() {
        let allowed = Allowed::new(&[], &strings(&["https://ops.example.com/"])).unwrap();
        let own = host("127.0.0.1:15680").origin(Scheme::Http);
        assert!(allowed.origin(&origin("http://127.0.0.1:15680"), Some(&own)));
        assert!(allowed.origin(&origin("https://OPS.example.com:443"), Some(&own)));
        assert!(allowed.origin(&origin("https://ops.example.com"), None));
        for refused in [
            "http://127.0.0.1:8080",
            "https://127.0.0.1:15680",
            "http://evil.example",
            "http://ops.example.com",
        ] {
            assert!(!allowed.origin(&origin(refused), Some(&own)), "{refused}");
        }
    }

    #[test]
    fn bad_allow_entries_are_errors_naming_them() {
        for (hosts, origins, named) in [
            (&["hopper.internal:15680"][..], &[][..], "hopper.internal:15680"),
            (&["10.0.0.1"], &[], "10.0.0.1"),
            (&["http://x"], &[], "http://x"),
            (&[], &["null"], "null"),
            (&[], &["*"], "*"),
            (&[], &["ops.example.com"], "ops.example.com"),
            (&[], &["https://ops.example.com/app"], "https://ops.example.com/app"),
        ] {
            let error = Allowed::new(&strings(hosts), &strings(origins)).unwrap_err();
            assert!(error.contains(&format!("'{named}'")), "{error}");
        }
    }
}
