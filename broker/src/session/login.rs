//! The authentication part of the handshake. A `Hello` names a mechanism:
//!
//! - `SCRAM-SHA-256`: the Hello carries the client-first-message; the broker answers with an
//!   `AuthChallenge` (server-first), the client with an `AuthResponse` (client-final), and the
//!   broker ends with `HelloOk` carrying the server-final-message, or `HelloRejected`.
//! - `PLAIN`: accepted only over TLS, where the password is not readable on the wire.
//! - `EXTERNAL`: the user named by the client certificate that the TLS listener verified
//!   (mutual TLS); the Hello's initial response is empty or that same user name.
//! - none: the built-in guest, from loopback only, while no admin user exists.
//!
//! An unknown user runs the same exchange against a decoy verifier, so it fails exactly like a
//! wrong password. Every failure from an address makes its next one answer later.

use std::net::IpAddr;
use std::time::Duration;

use hopper_proto::scram::{self, Server};

use crate::auth::Users;
use crate::error::BrokerError;

/// The mechanism name of a login by client certificate.
const EXTERNAL: &str = "EXTERNAL";

/// What the connection itself proves about the peer.
#[derive(Debug, Clone, Default)]
pub(crate) struct Transport {
    /// The connection runs over TLS.
    pub tls: bool,
    /// The user named by the client's verified certificate (mutual TLS): its subject CN, or
    /// its first DNS name.
    pub certificate_user: Option<String>,
}

/// Where a login stands after a step.
pub(super) enum Step {
    /// Send this challenge and wait for the client's response.
    Challenge(Vec<u8>, Pending),
    /// Logged in as `user`; `auth` goes back in HelloOk.
    Done { user: String, mechanism: &'static str, auth: Vec<u8> },
    /// Refused: answer after `delay`, then close.
    Refused { reason: String, delay: Duration },
}

/// A SCRAM exchange waiting for the client-final-message.
pub(super) struct Pending {
    server: Server,
    /// False when the user does not exist and the exchange runs against a decoy.
    known: bool,
}

/// Starts a login from `peer` with the Hello's mechanism and initial response.
pub(super) fn start(
    users: &Users,
    peer: IpAddr,
    mechanism: &str,
    initial: &[u8],
    transport: &Transport,
) -> Step {
    match mechanism {
        "" => match users.anonymous(peer) {
            Ok(account) => Step::Done { user: account.name.clone(), mechanism: "default", auth: Vec::new() },
            Err(err) => refuse(users, peer, None, err),
        },
        scram::MECHANISM => start_scram(users, peer, initial),
        "PLAIN" if transport.tls => plain(users, peer, initial),
        "PLAIN" => Step::Refused {
            reason: "PLAIN sends the password readable and is accepted only over TLS; use SCRAM-SHA-256"
                .into(),
            delay: Duration::ZERO,
        },
        EXTERNAL => external(users, peer, initial, transport.certificate_user.as_deref()),
        other => Step::Refused {
            reason: format!(
                "unknown authentication mechanism '{other}'; this broker offers SCRAM-SHA-256, and over \
                 TLS also PLAIN and EXTERNAL"
            ),
            delay: Duration::ZERO,
        },
    }
}

/// Ends a SCRAM exchange with the client-final-message.
pub(super) fn finish(users: &Users, peer: IpAddr, pending: Pending, response: &[u8]) -> Step {
    let user = pending.server.user().to_owned();
    let result = std::str::from_utf8(response)
        .map_err(|_| scram::ScramError::Malformed("client-final-message is not UTF-8".into()))
        .and_then(|text| pending.server.finish(text));
    match result {
        Ok(done) if pending.known => {
            users.throttle.succeeded(peer);
            Step::Done { user: done.user, mechanism: scram::MECHANISM, auth: done.server_final.into_bytes() }
        }
        Ok(_) | Err(scram::ScramError::InvalidProof) => refuse(
            users,
            peer,
            Some(&user),
            BrokerError::Unauthenticated(format!("authentication failed for user '{user}'")),
        ),
        Err(err) => refuse(
            users,
            peer,
            Some(&user),
            BrokerError::Unauthenticated(format!("authentication failed: {err}")),
        ),
    }
}

fn start_scram(users: &Users, peer: IpAddr, initial: &[u8]) -> Step {
    let first = match std::str::from_utf8(initial)
        .map_err(|_| scram::ScramError::Malformed("client-first-message is not UTF-8".into()))
        .and_then(scram::parse_client_first)
    {
        Ok(first) => first,
        Err(err) => {
            return refuse(
                users,
                peer,
                None,
                BrokerError::Unauthenticated(format!("authentication failed: {err}")),
            )
        }
    };
    let user = first.user.clone();
    let (verifier, known) = match users.login_account(&user, peer) {
        Ok(Some(account)) => (account.verifier.clone(), true),
        Ok(None) => (users.decoy(&user), false),
        Err(err) => return refuse(users, peer, Some(&user), err),
    };
    let (server, challenge) = Server::start(first, &verifier);
    Step::Challenge(challenge.into_bytes(), Pending { server, known })
}

/// `\0user\0password` (RFC 4616; an authorization identity, if any, must be the user).
fn plain(users: &Users, peer: IpAddr, initial: &[u8]) -> Step {
    let parts: Vec<&[u8]> = initial.split(|b| *b == 0).collect();
    let (authz, user, password) = match parts.as_slice() {
        [authz, user, password] => (*authz, *user, *password),
        _ => {
            let err =
                BrokerError::Unauthenticated("PLAIN response must be authzid NUL user NUL password".into());
            return refuse(users, peer, None, err);
        }
    };
    let (Ok(user), Ok(password)) = (std::str::from_utf8(user), std::str::from_utf8(password)) else {
        let err = BrokerError::Unauthenticated("PLAIN user and password must be UTF-8".into());
        return refuse(users, peer, None, err);
    };
    if !authz.is_empty() && authz != user.as_bytes() {
        let err =
            BrokerError::Unauthenticated("PLAIN authorization identity must be empty or the user".into());
        return refuse(users, peer, Some(user), err);
    }
    let verifier = match users.login_account(user, peer) {
        Ok(Some(account)) => Some(account.verifier.clone()),
        Ok(None) => None,
        Err(err) => return refuse(users, peer, Some(user), err),
    };
    // An unknown user costs the same key derivation as a known one.
    let known = verifier.is_some();
    let verifier = verifier.unwrap_or_else(|| users.decoy(user));
    if verifier.matches(password) && known {
        users.throttle.succeeded(peer);
        return Step::Done { user: user.to_owned(), mechanism: "PLAIN", auth: Vec::new() };
    }
    let err = BrokerError::Unauthenticated(format!("authentication failed for user '{user}'"));
    refuse(users, peer, Some(user), err)
}

/// The user of the verified client certificate (RFC 4422 EXTERNAL), who must exist. The
/// certificate is the proof: the users file is asked only whether the user may log in.
fn external(users: &Users, peer: IpAddr, authzid: &[u8], certified: Option<&str>) -> Step {
    let Some(user) = certified else {
        let err = BrokerError::Unauthenticated(
            "EXTERNAL needs a client certificate verified by the broker's TLS listener (mutual TLS, \
             hopperd --tls-client-ca) whose subject CN or DNS name is a user"
                .into(),
        );
        return refuse(users, peer, None, err);
    };
    if !authzid.is_empty() && authzid != user.as_bytes() {
        let err = BrokerError::Unauthenticated(format!(
            "EXTERNAL authorization identity must be empty or the certificate's user '{user}'"
        ));
        return refuse(users, peer, Some(user), err);
    }
    match users.login_account(user, peer) {
        Ok(Some(account)) => {
            users.throttle.succeeded(peer);
            Step::Done { user: account.name.clone(), mechanism: EXTERNAL, auth: Vec::new() }
        }
        Ok(None) => refuse(
            users,
            peer,
            Some(user),
            BrokerError::Unauthenticated(format!(
                "the client certificate names user '{user}', who does not exist on this broker"
            )),
        ),
        Err(err) => refuse(users, peer, Some(user), err),
    }
}

/// A refusal, counted against `peer` and logged for the operator.
fn refuse(users: &Users, peer: IpAddr, user: Option<&str>, err: BrokerError) -> Step {
    let delay = users.refused_login(peer, user.unwrap_or(""), "binary protocol", &err);
    Step::Refused { reason: err.to_string(), delay }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users_with_alice() -> (tempfile::TempDir, Users) {
        let dir = tempfile::tempdir().unwrap();
        let users = Users::open(dir.path()).unwrap();
        users.put("alice", Some("alice-pw"), Vec::new(), false).unwrap();
        (dir, users)
    }

    fn over_tls(certificate_user: Option<&str>) -> Transport {
        Transport { tls: true, certificate_user: certificate_user.map(str::to_owned) }
    }

    fn refusal(step: Step) -> String {
        match step {
            Step::Refused { reason, .. } => reason,
            Step::Done { user, .. } => panic!("logged in as {user}"),
            Step::Challenge(..) => panic!("challenged"),
        }
    }

    const LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[test]
    fn external_logs_in_the_certificate_user() {
        let (_dir, users) = users_with_alice();
        for authzid in [&b""[..], b"alice"] {
            match start(&users, LOOPBACK, EXTERNAL, authzid, &over_tls(Some("alice"))) {
                Step::Done { user, mechanism, .. } => {
                    assert_eq!((user.as_str(), mechanism), ("alice", EXTERNAL))
                }
                _ => panic!("alice logs in by certificate"),
            }
        }
    }

    #[test]
    fn external_needs_a_certificate_of_a_known_user_and_no_other_identity() {
        let (_dir, users) = users_with_alice();
        let reason = refusal(start(&users, LOOPBACK, EXTERNAL, b"", &over_tls(None)));
        assert!(reason.contains("client certificate"), "{reason}");
        let reason = refusal(start(&users, LOOPBACK, EXTERNAL, b"", &Transport::default()));
        assert!(reason.contains("client certificate"), "{reason}");
        let reason = refusal(start(&users, LOOPBACK, EXTERNAL, b"", &over_tls(Some("mallory"))));
        assert!(reason.contains("'mallory', who does not exist"), "{reason}");
        let reason = refusal(start(&users, LOOPBACK, EXTERNAL, b"root", &over_tls(Some("alice"))));
        assert!(reason.contains("authorization identity"), "{reason}");
    }

    #[test]
    fn plain_only_over_tls() {
        let (_dir, users) = users_with_alice();
        let reason = refusal(start(&users, LOOPBACK, "PLAIN", b"\0alice\0alice-pw", &Transport::default()));
        assert!(reason.contains("only over TLS"), "{reason}");
        match start(&users, LOOPBACK, "PLAIN", b"\0alice\0alice-pw", &over_tls(None)) {
            Step::Done { user, mechanism, .. } => assert_eq!((user.as_str(), mechanism), ("alice", "PLAIN")),
            _ => panic!("PLAIN over TLS logs in"),
        }
    }
}
