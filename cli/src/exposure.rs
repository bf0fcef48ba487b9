//! Secure by default: an agent, or a gateway's admin service, that other
//! machines can reach serves only with TLS and a token. A source agent
//! streams the whole control plane (a Kubernetes cluster's Secrets
//! included) and takes Fence and Unfence; a target agent writes the new
//! plane; a gateway's admin service holds and switches every client's
//! writes. Bound to a loopback address they are reachable from this
//! machine only, and start as they are.

use std::net::{IpAddr, SocketAddr};

use tracing::warn;

use crate::commands::UsageError;

/// A server about to serve, and what protects it.
#[derive(Debug, Clone, Copy)]
pub struct Exposure<'a> {
    /// What serves, for the message: `the source agent`.
    pub service: &'a str,
    /// What anyone who reaches it could do: `read the whole control plane ...`.
    pub risk: &'a str,
    /// The flag that chose the address: `--listen`.
    pub flag: &'a str,
    /// The address as given on the command line.
    pub requested: &'a str,
    /// Where it is bound.
    pub bound: SocketAddr,
    /// Served over TLS.
    pub tls: bool,
    /// Every call must carry the token.
    pub token: bool,
}

/// True for 127.0.0.0/8, ::1 and ::ffff:127.0.0.0/104: only this machine
/// reaches them. 0.0.0.0 and [::] are every address, not loopback.
pub fn is_loopback(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Refuses (a usage error, exit 2) to serve where other machines reach the
/// server without both TLS and a token, unless `insecure` (the operator's
/// `--insecure-listen`) says so; then it warns.
pub fn check(exposure: &Exposure<'_>, insecure: bool) -> Result<(), UsageError> {
    if is_loopback(exposure.bound.ip()) || (exposure.tls && exposure.token) {
        return Ok(());
    }
    let missing = match (exposure.tls, exposure.token) {
        (false, false) => "without TLS and without a token",
        (false, true) => "without TLS (its token would cross the network in clear)",
        (true, false) => "without a token",
        (true, true) => unreachable!("TLS and a token are enough"),
    };
    if insecure {
        warn!(
            service = exposure.service,
            address = %exposure.bound,
            tls = exposure.tls,
            token_required = exposure.token,
            "serving on a non-loopback address {missing} (--insecure-listen)"
        );
        return Ok(());
    }
    let mut remedy = Vec::new();
    if !exposure.tls {
        remedy.push("--tls-cert-file FILE --tls-key-file FILE");
    }
    if !exposure.token {
        remedy.push("--token-file FILE (or FERRY_AGENT_TOKEN)");
    }
    Err(UsageError(format!(
        "{service} would serve on {bound} ({flag} {requested}), which is not a loopback address, {missing}: anyone who reaches it could {risk}. Pass {remedy}, or bind {flag} to 127.0.0.1, or pass --insecure-listen to serve it this way on a network you trust",
        service = exposure.service,
        bound = exposure.bound,
        flag = exposure.flag,
        requested = exposure.requested,
        risk = exposure.risk,
        remedy = remedy.join(" and "),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposure(bound: &str, tls: bool, token: bool) -> Exposure<'static> {
        Exposure {
            service: "the source agent",
            risk: "read the whole control plane",
            flag: "--listen",
            requested: "0.0.0.0:7400",
            bound: bound.parse().expect("a socket address"),
            tls,
            token,
        }
    }

    #[test]
    fn loopback_is_this_machine_only() {
        for address in ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"] {
            assert!(
                is_loopback(address.parse().expect("an IP address")),
                "{address}"
            );
        }
        for address in [
            "0.0.0.0",
            "::",
            "10.0.0.1",
            "192.168.1.2",
            "::ffff:10.0.0.1",
            "fe80::1",
        ] {
            assert!(
                !is_loopback(address.parse().expect("an IP address")),
                "{address}"
            );
        }
    }

    #[test]
    fn a_non_loopback_server_needs_tls_and_a_token_or_the_insecure_flag() {
        assert!(check(&exposure("127.0.0.1:7400", false, false), false).is_ok());
        assert!(check(&exposure("[::1]:7400", false, false), false).is_ok());
        assert!(check(&exposure("0.0.0.0:7400", true, true), false).is_ok());
        assert!(check(&exposure("[::]:7400", false, false), true).is_ok());

        let UsageError(neither) =
            check(&exposure("0.0.0.0:7400", false, false), false).expect_err("no TLS, no token");
        for part in [
            "the source agent would serve on 0.0.0.0:7400 (--listen 0.0.0.0:7400)",
            "without TLS and without a token",
            "--tls-cert-file FILE --tls-key-file FILE and --token-file FILE (or FERRY_AGENT_TOKEN)",
            "--insecure-listen",
        ] {
            assert!(neither.contains(part), "{part:?} in {neither}");
        }
        let UsageError(no_tls) =
            check(&exposure("[::]:7400", false, true), false).expect_err("a token alone");
        assert!(no_tls.contains("without TLS"), "{no_tls}");
        assert!(!no_tls.contains("--token-file"), "{no_tls}");
        let UsageError(no_token) =
            check(&exposure("10.0.0.1:7400", true, false), false).expect_err("TLS alone");
        assert!(no_token.contains("without a token"), "{no_token}");
        assert!(!no_token.contains("--tls-cert-file"), "{no_token}");
    }
}
