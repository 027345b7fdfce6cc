//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as pure state machines: the client and server sides of the
//! exchange, and the [`Verifier`] the broker stores instead of a password. Nothing here does I/O;
//! the only thing taken from the system is randomness for nonces and salts, and every function
//! that draws it has a `with_*` twin that takes the value instead.
//!
//! # The exchange
//!
//! ```text
//! client                                              server
//!   client-first   n,,n=user,r=cnonce            -->
//!                                                <--  server-first   r=cnonce+snonce,s=salt,i=4096
//!   client-final   c=biws,r=cnonce+snonce,p=proof -->
//!                                                <--  server-final   v=signature  (or e=error)
//! ```
//!
//! The client proves it knows the password without sending it; the server proves it holds the
//! user's verifier, so a client never finishes an exchange against an impostor.
//!
//! # Choices within the RFCs
//!
//! - **No channel binding.** The gs2 header must be `n,,`; `y` and `p=...` are refused with
//!   [`ScramError::ChannelBindingUnsupported`]. TLS, where used, protects the exchange as a whole.
//! - **Authorization identity.** An `a=` authzid is accepted only when it names the user being
//!   authenticated (acting as another user is not supported); anything else is
//!   [`ScramError::AuthzidMismatch`]. The client never sends one.
//! - **User names** are escaped (`,` as `=2C`, `=` as `=3D`) and otherwise used exactly as
//!   given: no SASLprep, so the name a client sends is byte for byte the name looked up.
//! - **Passwords** go through SASLprep (RFC 4013, via the `stringprep` crate) on both sides, so
//!   `"I\u{AD}X"` and `"IX"` are the same password. A password SASLprep refuses (one with control
//!   or unassigned characters) is used as given rather than refused, as PostgreSQL does: both
//!   sides make the same choice, so such a password still works.
//! - **Mandatory extensions** (`m=`) are refused with [`ScramError::MandatoryExtension`]; optional
//!   extensions are checked for syntax and ignored.
//! - **Iteration counts** above [`MAX_ITERATIONS`] are refused by the client, so a hostile server
//!   cannot make it spin for minutes.

use std::borrow::Cow;
use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The mechanism's name, as announced in the handshake.
pub const MECHANISM: &str = "SCRAM-SHA-256";
/// Default PBKDF2 iteration count stored for new users (RFC 7677's minimum).
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// Highest iteration count a client accepts from a server: far above any sane setting, low
/// enough that a hostile server cannot keep a client busy for long.
pub const MAX_ITERATIONS: u32 = 10_000_000;

/// Bytes of salt in a new verifier.
const SALT_LEN: usize = 16;
/// Random bytes in a nonce (base64-encoded to 24 printable characters).
const NONCE_LEN: usize = 18;
/// The only gs2 header this module speaks: no channel binding, no authzid.
const GS2_HEADER: &str = "n,,";
/// `GS2_HEADER` in base64, as client-final carries it.
const GS2_HEADER_BASE64: &str = "biws";

type HmacSha256 = Hmac<Sha256>;

/// Why an exchange failed. `Display` is a sentence a user can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// A message is not as RFC 5802 says; the text says what is wrong.
    #[error("malformed SCRAM message: {0}")]
    Malformed(String),
    /// The client asked for channel binding (gs2 flag `y` or `p=`).
    #[error("SCRAM channel binding is not supported: the client-first-message must start with \"n,,\"")]
    ChannelBindingUnsupported,
    /// The channel binding in client-final is not the gs2 header client-first sent.
    #[error("SCRAM channel binding mismatch: client-final's \"c=\" is not the gs2 header of client-first")]
    ChannelBindingMismatch,
    /// The client asked to act as another user.
    #[error("authorization identity '{authzid}' differs from user '{user}'; acting as another user is not supported")]
    AuthzidMismatch {
        /// The identity asked for.
        authzid: String,
        /// The user authenticating.
        user: String,
    },
    /// The peer sent a mandatory extension (`m=`), which this implementation does not know.
    #[error("the peer requires a SCRAM extension (\"m=\") that is not supported")]
    MandatoryExtension,
    /// A nonce does not continue this exchange: a replayed message, or one from another exchange.
    #[error("SCRAM nonce mismatch: the message does not belong to this exchange")]
    NonceMismatch,
    /// The client's proof is wrong: wrong password, or a user that does not exist.
    #[error("authentication failed: unknown user or wrong password")]
    InvalidProof,
    /// The server's signature is wrong: it does not hold the user's verifier.
    #[error("the server did not prove it knows the password; it may be an impostor")]
    ServerSignature,
    /// The server ended the exchange with an error (`e=...`).
    #[error("the server refused authentication: {0}")]
    Server(String),
}

fn malformed(text: impl Into<String>) -> ScramError {
    ScramError::Malformed(text.into())
}

/// What the server stores for a user instead of the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    /// The salt PBKDF2 ran with.
    pub salt: Vec<u8>,
    /// PBKDF2's iteration count.
    pub iterations: u32,
    /// `H(HMAC(SaltedPassword, "Client Key"))`: checks the client's proof.
    pub stored_key: [u8; 32],
    /// `HMAC(SaltedPassword, "Server Key")`: signs the server's answer.
    pub server_key: [u8; 32],
}

impl Verifier {
    /// The verifier of `password` with this salt and iteration count. The count is clamped to
    /// `1..=MAX_ITERATIONS`, so every verifier made here is one a [`Client`] accepts.
    pub fn derive(password: &str, salt: &[u8], iterations: u32) -> Verifier {
        let iterations = iterations.clamp(1, MAX_ITERATIONS);
        let keys = Keys::derive(password, salt, iterations);
        Verifier {
            salt: salt.to_vec(),
            iterations,
            stored_key: sha256(&keys.client_key),
            server_key: keys.server_key,
        }
    }

    /// The verifier of `password` with a fresh random 16-byte salt.
    pub fn new(password: &str, iterations: u32) -> Verifier {
        Verifier::derive(password, &rand::random::<[u8; SALT_LEN]>(), iterations)
    }

    /// True if `password` is this verifier's, compared in constant time. For PLAIN over TLS
    /// and HTTP Basic auth; costs one PBKDF2 run.
    pub fn matches(&self, password: &str) -> bool {
        let other = Verifier::derive(password, &self.salt, self.iterations);
        (other.stored_key.ct_eq(&self.stored_key) & other.server_key.ct_eq(&self.server_key)).into()
    }
}

// The keys are as good as the password to anyone who also sees an exchange: keep them out of logs.
impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier").field("iterations", &self.iterations).finish_non_exhaustive()
    }
}

/// A verifier for a user that does not exist, derived from the name and a server secret. The
/// server runs the exchange against it as for a real user, so an unknown user takes the same
/// path and time as a wrong password, and gets the same salt on every try: the two cannot be
/// told apart. No password matches it.
///
/// `secret` should be at least 32 random bytes, and `iterations` the count new users get.
pub fn decoy_verifier(user: &str, secret: &[u8], iterations: u32) -> Verifier {
    let key = |label: &[u8]| hmac(secret, &[b"hopper scram decoy\0", label, b"\0", user.as_bytes()]);
    Verifier {
        salt: key(b"salt")[..SALT_LEN].to_vec(),
        iterations: iterations.clamp(1, MAX_ITERATIONS),
        // Not the hash of any known key: a proof would need a SHA-256 preimage.
        stored_key: key(b"stored key"),
        server_key: key(b"server key"),
    }
}

/// The client side after sending client-first, awaiting server-first.
#[derive(Debug)]
pub struct Client {
    nonce: String,
    first_bare: String,
}

impl Client {
    /// Starts an exchange for `user` with a random nonce; returns the state and the
    /// client-first-message (`n,,n=user,r=nonce`).
    pub fn start(user: &str) -> (Client, String) {
        Client::with_nonce(user, &random_nonce())
    }

    /// Same as [`Client::start`] with a given nonce (for tests). The nonce must be printable
    /// ASCII without `,`, or the server refuses the message.
    pub fn with_nonce(user: &str, nonce: &str) -> (Client, String) {
        let first_bare = format!("n={},r={nonce}", escape_user(user));
        let message = format!("{GS2_HEADER}{first_bare}");
        (Client { nonce: nonce.to_owned(), first_bare }, message)
    }

    /// Takes the server-first-message and the password; returns the client-final-message and
    /// the state awaiting server-final.
    pub fn respond(self, server_first: &str, password: &str) -> Result<(ClientFinal, String), ScramError> {
        let mut attrs = Attrs::new("server-first-message", server_first);
        let nonce = attrs.take(b'r', "nonce")?;
        let salt = attrs.take(b's', "salt")?;
        let iterations = attrs.take(b'i', "iteration count")?;
        attrs.extensions()?;
        check_nonce(nonce)?;
        // The server's nonce must extend ours: anything else answers another exchange.
        if nonce.len() <= self.nonce.len() || !nonce.starts_with(&self.nonce) {
            return Err(ScramError::NonceMismatch);
        }
        let salt = decode_base64(salt, "salt")?;
        if salt.is_empty() {
            return Err(malformed("server-first-message: the salt is empty"));
        }
        let iterations = parse_iterations(iterations)?;

        let keys = Keys::derive(password, &salt, iterations);
        let stored_key = sha256(&keys.client_key);
        let without_proof = format!("c={GS2_HEADER_BASE64},r={nonce}");
        let prefix = format!("{},{server_first}", self.first_bare);
        let auth_message = auth_message(&prefix, &without_proof);
        let proof = xor(&keys.client_key, &hmac(&stored_key, &auth_message));
        let server_signature = hmac(&keys.server_key, &auth_message);
        let message = format!("{without_proof},p={}", BASE64.encode(proof));
        Ok((ClientFinal { server_signature }, message))
    }
}

/// The client side after sending client-final, awaiting server-final.
pub struct ClientFinal {
    server_signature: [u8; 32],
}

impl ClientFinal {
    /// Checks the server-final-message. `Err` if it carries `e=...`
    /// ([`ScramError::Server`]) or its signature does not prove the server holds the user's
    /// verifier ([`ScramError::ServerSignature`]).
    pub fn finish(self, server_final: &str) -> Result<(), ScramError> {
        let mut attrs = Attrs::new("server-final-message", server_final);
        match attrs.next("'v=' (server signature) or 'e=' (error)")? {
            (b'e', error) => Err(ScramError::Server(error.to_owned())),
            (b'v', signature) => {
                attrs.extensions()?;
                let signature = decode_base64(signature, "server signature")?;
                if signature.len() != self.server_signature.len() {
                    return Err(malformed(format!(
                        "server-final-message: the server signature is {} bytes, expected 32",
                        signature.len()
                    )));
                }
                if bool::from(signature.ct_eq(&self.server_signature)) {
                    Ok(())
                } else {
                    Err(ScramError::ServerSignature)
                }
            }
            (name, _) => Err(unexpected("server-final-message", "'v=' or 'e='", name)),
        }
    }
}

impl fmt::Debug for ClientFinal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientFinal").finish_non_exhaustive()
    }
}

/// A parsed client-first-message, as the server sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFirst {
    /// The user name, unescaped.
    pub user: String,
    /// The client's nonce.
    nonce: String,
    /// The gs2 header as sent (`n,,` or `n,a=user,`): client-final must bind to it.
    gs2_header: String,
    /// client-first-message-bare: the first part of the AuthMessage.
    bare: String,
}

/// Parses a client-first-message (`n,,n=user,r=nonce`).
pub fn parse_client_first(message: &str) -> Result<ClientFirst, ScramError> {
    const WHAT: &str = "client-first-message";
    let Some((flag, rest)) = message.split_once(',') else {
        return Err(malformed(format!("{WHAT}: expected a gs2 header such as \"n,,\"")));
    };
    match flag {
        "n" => {}
        "y" => return Err(ScramError::ChannelBindingUnsupported),
        _ if flag.starts_with("p=") => return Err(ScramError::ChannelBindingUnsupported),
        _ => return Err(malformed(format!("{WHAT}: the gs2 header must start with \"n,\""))),
    }
    let Some((authzid, bare)) = rest.split_once(',') else {
        return Err(malformed(format!("{WHAT}: the gs2 header must end with ','")));
    };
    let gs2_header = &message[..message.len() - bare.len()];

    let mut attrs = Attrs::new(WHAT, bare);
    let user = decode_user(attrs.take(b'n', "user name")?)?;
    let nonce = attrs.take(b'r', "nonce")?;
    attrs.extensions()?;
    check_nonce(nonce)?;
    if !authzid.is_empty() {
        let Some(authzid) = authzid.strip_prefix("a=") else {
            return Err(malformed(format!("{WHAT}: the authorization identity must be 'a=name'")));
        };
        let authzid = decode_user(authzid)?;
        if authzid != user {
            return Err(ScramError::AuthzidMismatch { authzid, user });
        }
    }
    Ok(ClientFirst {
        user,
        nonce: nonce.to_owned(),
        gs2_header: gs2_header.to_owned(),
        bare: bare.to_owned(),
    })
}

/// The server side after sending server-first, awaiting client-final.
pub struct Server {
    user: String,
    gs2_header: String,
    /// Client and server nonce together.
    nonce: String,
    /// client-first-message-bare "," server-first-message: the AuthMessage's first two parts.
    auth_prefix: String,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

/// A successful exchange, as the server ends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// The user who proved they know the password.
    pub user: String,
    /// The server-final-message (`v=...`) to send back, so the client can check the server.
    pub server_final: String,
}

impl Server {
    /// Answers client-first with server-first (`r=cnonce+snonce,s=salt,i=N`) for `verifier`,
    /// with a random server nonce.
    pub fn start(first: ClientFirst, verifier: &Verifier) -> (Server, String) {
        Server::with_nonce(first, verifier, &random_nonce())
    }

    /// Same as [`Server::start`] with a given server nonce (for tests). The nonce must be
    /// printable ASCII without `,`, or the client refuses the message.
    pub fn with_nonce(first: ClientFirst, verifier: &Verifier, server_nonce: &str) -> (Server, String) {
        let nonce = format!("{}{server_nonce}", first.nonce);
        let message = format!("r={nonce},s={},i={}", BASE64.encode(&verifier.salt), verifier.iterations);
        let server = Server {
            user: first.user,
            gs2_header: first.gs2_header,
            nonce,
            auth_prefix: format!("{},{message}", first.bare),
            stored_key: verifier.stored_key,
            server_key: verifier.server_key,
        };
        (server, message)
    }

    /// The user name the client claims; proven only once [`Server::finish`] succeeds.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// Checks client-final (channel binding, nonce, proof). On success returns the user and
    /// the server-final-message (`v=...`) to send. Consumes the exchange: one proof per try.
    pub fn finish(self, client_final: &str) -> Result<Authenticated, ScramError> {
        const WHAT: &str = "client-final-message";
        // The proof is the last attribute and the one part the AuthMessage leaves out.
        let Some((without_proof, proof)) = client_final.rsplit_once(',') else {
            return Err(malformed(format!("{WHAT}: expected 'c=...,r=...,p=...'")));
        };
        let mut attrs = Attrs::new(WHAT, without_proof);
        let binding = attrs.take(b'c', "channel binding")?;
        let nonce = attrs.take(b'r', "nonce")?;
        attrs.extensions()?;
        let proof = Attrs::new(WHAT, proof).take(b'p', "proof")?;

        if decode_base64(binding, "channel binding")? != self.gs2_header.as_bytes() {
            return Err(ScramError::ChannelBindingMismatch);
        }
        if nonce != self.nonce {
            return Err(ScramError::NonceMismatch);
        }
        let proof = decode_base64(proof, "proof")?;
        let Ok(proof) = <[u8; 32]>::try_from(proof.as_slice()) else {
            return Err(malformed(format!("{WHAT}: the proof is {} bytes, expected 32", proof.len())));
        };

        let auth_message = auth_message(&self.auth_prefix, without_proof);
        let client_key = xor(&proof, &hmac(&self.stored_key, &auth_message));
        if !bool::from(sha256(&client_key).ct_eq(&self.stored_key)) {
            return Err(ScramError::InvalidProof);
        }
        let signature = hmac(&self.server_key, &auth_message);
        Ok(Authenticated { user: self.user, server_final: format!("v={}", BASE64.encode(signature)) })
    }
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server").field("user", &self.user).finish_non_exhaustive()
    }
}

/// The comma-separated `x=value` attributes of one message, read in order.
struct Attrs<'a> {
    /// The message's name, for errors.
    what: &'static str,
    parts: std::str::Split<'a, char>,
}

impl<'a> Attrs<'a> {
    fn new(what: &'static str, text: &'a str) -> Self {
        Attrs { what, parts: text.split(',') }
    }

    /// The next attribute's name and value; `wanted` says what was expected, for errors.
    fn next(&mut self, wanted: &str) -> Result<(u8, &'a str), ScramError> {
        let what = self.what;
        let part = self.parts.next().ok_or_else(|| malformed(format!("{what}: {wanted} is missing")))?;
        match part.as_bytes() {
            // Both bytes are ASCII, so 2 is a char boundary.
            [name, b'=', ..] if name.is_ascii_alphabetic() => Ok((*name, &part[2..])),
            [] => Err(malformed(format!("{what}: expected {wanted}, found an empty attribute"))),
            _ => Err(malformed(format!("{what}: expected {wanted}, found text that is not 'x=value'"))),
        }
    }

    /// The value of the next attribute, which must be `name`.
    fn take(&mut self, name: u8, meaning: &str) -> Result<&'a str, ScramError> {
        let wanted = || format!("'{}=' ({meaning})", char::from(name));
        match self.next(&wanted())? {
            (found, value) if found == name => Ok(value),
            (found, _) => Err(unexpected(self.what, &wanted(), found)),
        }
    }

    /// Checks that the attributes left are optional extensions, which are ignored.
    fn extensions(self) -> Result<(), ScramError> {
        let what = self.what;
        for part in self.parts {
            match part.as_bytes() {
                [b'm', b'=', ..] => return Err(ScramError::MandatoryExtension),
                [name, b'=', ..] if name.is_ascii_alphabetic() => {}
                _ => return Err(malformed(format!("{what}: an extension is not 'x=value'"))),
            }
        }
        Ok(())
    }
}

/// The error for attribute `found` where `wanted` belongs.
fn unexpected(what: &str, wanted: &str, found: u8) -> ScramError {
    if found == b'm' {
        return ScramError::MandatoryExtension;
    }
    malformed(format!("{what}: expected {wanted}, found '{}='", char::from(found)))
}

/// Escapes a user name as a saslname: `=` as `=3D`, `,` as `=2C`.
fn escape_user(user: &str) -> String {
    user.replace('=', "=3D").replace(',', "=2C")
}

/// Unescapes a saslname; `Err` on a stray `=`, an empty name, or NUL.
fn decode_user(name: &str) -> Result<String, ScramError> {
    if name.is_empty() {
        return Err(malformed("the user name is empty"));
    }
    if name.contains('\0') {
        return Err(malformed("the user name contains NUL"));
    }
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(at) = rest.find('=') {
        out.push_str(&rest[..at]);
        let escape = rest.get(at..at + 3);
        match escape.map(str::to_ascii_uppercase).as_deref() {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return Err(malformed("the user name has a '=' that is not '=2C' or '=3D'")),
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A nonce is one or more printable ASCII characters other than `,`.
fn check_nonce(nonce: &str) -> Result<(), ScramError> {
    if nonce.is_empty() {
        return Err(malformed("the nonce is empty"));
    }
    if !nonce.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',') {
        return Err(malformed("the nonce has characters other than printable ASCII"));
    }
    Ok(())
}

fn parse_iterations(text: &str) -> Result<u32, ScramError> {
    // Digits only: `u32::from_str` would also take a leading '+'.
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed("server-first-message: the iteration count is not a number"));
    }
    match text.parse::<u32>() {
        Ok(0) => Err(malformed("server-first-message: the iteration count is 0")),
        Ok(n) if n <= MAX_ITERATIONS => Ok(n),
        _ => Err(malformed(format!(
            "server-first-message: the iteration count {text} is above the limit of {MAX_ITERATIONS}"
        ))),
    }
}

fn decode_base64(text: &str, what: &str) -> Result<Vec<u8>, ScramError> {
    BASE64.decode(text).map_err(|e| malformed(format!("the {what} is not valid base64: {e}")))
}

fn random_nonce() -> String {
    BASE64.encode(rand::random::<[u8; NONCE_LEN]>())
}

/// The two keys derived from the salted password.
struct Keys {
    client_key: [u8; 32],
    server_key: [u8; 32],
}

impl Keys {
    fn derive(password: &str, salt: &[u8], iterations: u32) -> Keys {
        // SASLprep refuses some passwords; those are used as given (see the module docs).
        let password = stringprep::saslprep(password).unwrap_or(Cow::Borrowed(password));
        let salted = pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(password.as_bytes(), salt, iterations);
        Keys { client_key: hmac(&salted, &[b"Client Key"]), server_key: hmac(&salted, &[b"Server Key"]) }
    }
}

/// The AuthMessage, as the parts to hash: `prefix` is client-first-bare "," server-first.
fn auth_message<'a>(prefix: &'a str, without_proof: &'a str) -> [&'a [u8]; 3] {
    [prefix.as_bytes(), b",", without_proof.as_bytes()]
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn xor(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

#[cfg(test)]
mod tests;
