//! SCRAM tests: the RFC 7677 vector, round trips, every refusal, and parsers fed any text.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};

use super::*;

/// Low, so the many derivations here stay fast in a debug build.
const ITERATIONS: u32 = 64;

// RFC 7677, section 3.
const RFC_CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
const RFC_SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
const RFC_SALT: &str = "W22ZaJ0SNY7soEsUEjb6gQ==";
const RFC_CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
const RFC_SERVER_FIRST: &str =
    "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
const RFC_CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                                p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
const RFC_SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

/// Runs a whole exchange; the error is the first side's refusal.
fn exchange(user: &str, password: &str, verifier: &Verifier) -> Result<Authenticated, ScramError> {
    let (client, client_first) = Client::start(user);
    let first = parse_client_first(&client_first)?;
    let (server, server_first) = Server::start(first, verifier);
    let (client, client_final) = client.respond(&server_first, password)?;
    let done = server.finish(&client_final)?;
    client.finish(&done.server_final)?;
    Ok(done)
}

/// A server that has answered `client_first` for a user whose password is "pw".
fn server_for(client_first: &str) -> (Server, String) {
    let first = parse_client_first(client_first).expect("valid client-first");
    Server::with_nonce(first, &Verifier::derive("pw", b"salt", ITERATIONS), "snonce")
}

fn malformed_text(result: Result<impl fmt::Debug, ScramError>) -> String {
    match result {
        Err(ScramError::Malformed(text)) => text,
        other => panic!("expected Malformed, got {other:?}"),
    }
}

#[test]
fn rfc7677_client() {
    let (client, client_first) = Client::with_nonce("user", RFC_CLIENT_NONCE);
    assert_eq!(client_first, RFC_CLIENT_FIRST);
    let (client, client_final) = client.respond(RFC_SERVER_FIRST, "pencil").unwrap();
    assert_eq!(client_final, RFC_CLIENT_FINAL);
    client.finish(RFC_SERVER_FINAL).unwrap();
}

#[test]
fn rfc7677_server() {
    let salt = BASE64.decode(RFC_SALT).unwrap();
    let verifier = Verifier::derive("pencil", &salt, 4096);
    let first = parse_client_first(RFC_CLIENT_FIRST).unwrap();
    assert_eq!(first.user, "user");
    let (server, server_first) = Server::with_nonce(first, &verifier, RFC_SERVER_NONCE);
    assert_eq!(server_first, RFC_SERVER_FIRST);
    assert_eq!(server.user(), "user");
    let done = server.finish(RFC_CLIENT_FINAL).unwrap();
    assert_eq!(done, Authenticated { user: "user".into(), server_final: RFC_SERVER_FINAL.into() });
}

#[test]
fn round_trip_with_random_nonces() {
    let verifier = Verifier::new("correct horse", ITERATIONS);
    let done = exchange("alice", "correct horse", &verifier).unwrap();
    assert_eq!(done.user, "alice");

    let (_, a) = Client::start("alice");
    let (_, b) = Client::start("alice");
    assert_ne!(a, b, "each exchange has its own nonce");
    assert_ne!(Verifier::new("x", ITERATIONS).salt, Verifier::new("x", ITERATIONS).salt);
    assert_eq!(Verifier::new("x", ITERATIONS).salt.len(), 16);
}

#[test]
fn wrong_password_is_invalid_proof() {
    let verifier = Verifier::new("right", ITERATIONS);
    assert_eq!(exchange("alice", "wrong", &verifier), Err(ScramError::InvalidProof));
}

#[test]
fn unknown_user_fails_like_a_wrong_password() {
    let secret = [7u8; 32];
    let decoy = decoy_verifier("nobody", &secret, ITERATIONS);
    assert_eq!(exchange("nobody", "anything", &decoy), Err(ScramError::InvalidProof));
    // Same salt on every try, so asking twice tells nothing; another user gets another.
    assert_eq!(decoy, decoy_verifier("nobody", &secret, ITERATIONS));
    assert_ne!(decoy.salt, decoy_verifier("somebody", &secret, ITERATIONS).salt);
    assert_ne!(decoy.salt, decoy_verifier("nobody", &[8u8; 32], ITERATIONS).salt);
    assert_eq!(decoy.salt.len(), 16);
    assert!(!decoy.matches("anything"));
    assert!(!decoy.matches(""));
}

#[test]
fn client_refuses_a_server_that_cannot_sign() {
    let verifier = Verifier::derive("pw", b"salt", ITERATIONS);
    let (client, client_first) = Client::with_nonce("alice", "cnonce");
    let (server, server_first) = server_for(&client_first);
    let (client_done, client_final) = client.respond(&server_first, "pw").unwrap();
    let done = server.finish(&client_final).unwrap();

    let mut signature = BASE64.decode(&done.server_final[2..]).unwrap();
    signature[0] ^= 1;
    let tampered = format!("v={}", BASE64.encode(&signature));
    assert_eq!(client_done.finish(&tampered), Err(ScramError::ServerSignature));

    // An impostor without the verifier: a server keyed for another password.
    let (client, client_first) = Client::with_nonce("alice", "cnonce");
    let first = parse_client_first(&client_first).unwrap();
    let impostor =
        Verifier { stored_key: verifier.stored_key, ..Verifier::derive("guess", b"salt", ITERATIONS) };
    let (server, server_first) = Server::with_nonce(first, &impostor, "snonce");
    let (client, client_final) = client.respond(&server_first, "pw").unwrap();
    let done = server.finish(&client_final).unwrap();
    assert_eq!(client.finish(&done.server_final), Err(ScramError::ServerSignature));
}

#[test]
fn client_reports_a_server_error() {
    let (client, client_first) = Client::with_nonce("alice", "cnonce");
    let (_, server_first) = server_for(&client_first);
    let (client, _) = client.respond(&server_first, "pw").unwrap();
    assert_eq!(client.finish("e=invalid-proof"), Err(ScramError::Server("invalid-proof".into())));
}

#[test]
fn nonce_mismatches_are_refused() {
    // server-first that does not extend the client's nonce, or adds nothing to it.
    for server_first in
        ["r=othernonce,s=c2FsdA==,i=64", "r=cnonce,s=c2FsdA==,i=64", "r=cnonc,s=c2FsdA==,i=64"]
    {
        let (client, _) = Client::with_nonce("alice", "cnonce");
        assert_eq!(
            client.respond(server_first, "pw").unwrap_err(),
            ScramError::NonceMismatch,
            "{server_first}"
        );
    }

    // A client-final replayed from an earlier exchange into a new one.
    let (client, client_first) = Client::with_nonce("alice", "cnonce");
    let (server, server_first) = server_for(&client_first);
    let (_, old_final) = client.respond(&server_first, "pw").unwrap();
    server.finish(&old_final).unwrap();
    let first = parse_client_first(&client_first).unwrap();
    let verifier = Verifier::derive("pw", b"salt", ITERATIONS);
    let (server, _) = Server::with_nonce(first, &verifier, "fresh");
    assert_eq!(server.finish(&old_final).unwrap_err(), ScramError::NonceMismatch);
}

#[test]
fn channel_binding_is_refused() {
    for message in ["y,,n=user,r=abc", "p=tls-unique,,n=user,r=abc", "p=tls-server-end-point,,n=u,r=x"] {
        assert_eq!(parse_client_first(message), Err(ScramError::ChannelBindingUnsupported), "{message}");
    }
    let (server, _) = server_for("n,,n=user,r=abc");
    // "eSws" is "y,,": not the header client-first sent.
    let client_final = "c=eSws,r=abcsnonce,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    assert_eq!(server.finish(client_final).unwrap_err(), ScramError::ChannelBindingMismatch);
}

#[test]
fn authzid_must_be_the_user() {
    let first = parse_client_first("n,a=user,n=user,r=abc").unwrap();
    assert_eq!(first.user, "user");
    assert_eq!(first.gs2_header, "n,a=user,");
    assert_eq!(
        parse_client_first("n,a=admin,n=user,r=abc"),
        Err(ScramError::AuthzidMismatch { authzid: "admin".into(), user: "user".into() })
    );

    // The proof binds to the header as sent, authzid included. The client never sends an
    // authzid, so this client-final is made by hand.
    let verifier = Verifier::derive("pw", b"salt", ITERATIONS);
    let first = parse_client_first("n,a=user,n=user,r=abc").unwrap();
    let (server, server_first) = Server::with_nonce(first.clone(), &verifier, "s");
    let without_proof = format!("c={},r=abcs", BASE64.encode("n,a=user,"));
    let keys = Keys::derive("pw", b"salt", ITERATIONS);
    let prefix = format!("n=user,r=abc,{server_first}");
    let signature = hmac(&sha256(&keys.client_key), &auth_message(&prefix, &without_proof));
    let proof = BASE64.encode(xor(&keys.client_key, &signature));
    assert_eq!(server.finish(&format!("{without_proof},p={proof}")).unwrap().user, "user");
    // "c=biws" ("n,,") does not match the header this client-first sent.
    let (server, _) = Server::with_nonce(first, &verifier, "s");
    let client_final = format!("c=biws,r=abcs,p={proof}");
    assert_eq!(server.finish(&client_final).unwrap_err(), ScramError::ChannelBindingMismatch);
}

#[test]
fn mandatory_extensions_are_refused() {
    assert_eq!(parse_client_first("n,,m=ext,n=user,r=abc"), Err(ScramError::MandatoryExtension));
    assert_eq!(parse_client_first("n,,n=user,r=abc,m=ext"), Err(ScramError::MandatoryExtension));
    let (client, _) = Client::with_nonce("user", "abc");
    assert_eq!(
        client.respond("m=ext,r=abcd,s=c2FsdA==,i=64", "pw").unwrap_err(),
        ScramError::MandatoryExtension
    );
    // Optional extensions are ignored.
    assert_eq!(parse_client_first("n,,n=user,r=abc,x=1,y=2").unwrap().user, "user");
}

#[test]
fn malformed_client_first() {
    for message in [
        "",
        "n",
        "n,",
        "n,,",
        "n,,n=user",
        "n,,r=abc,n=user",
        "n,,n=,r=abc",
        "n,,n=us=er,r=abc",
        "n,,n=us=2,r=abc",
        "n,,n=us\0er,r=abc",
        "n,,n=user,r=",
        "n,,n=user,r=a b",
        "n,,n=user,r=abc,",
        "n,,n=user,r=abc,bad",
        "x,,n=user,r=abc",
        "n,b=user,n=user,r=abc",
        "n,a=,n=user,r=abc",
        "n,,n=user,,r=abc",
        "n,,1=user,r=abc",
        "n,,n=user,r=nonc\u{e9}",
    ] {
        malformed_text(parse_client_first(message));
    }
}

#[test]
fn malformed_server_first() {
    let cases = [
        ("", "nonce"),
        ("r=cnoncex", "salt"),
        ("r=cnoncex,s=c2FsdA==", "iteration count"),
        ("s=c2FsdA==,r=cnoncex,i=64", "nonce"),
        ("r=cnoncex,s=***,i=64", "base64"),
        ("r=cnoncex,s=,i=64", "empty"),
        ("r=cnoncex,s=c2FsdA==,i=abc", "not a number"),
        ("r=cnoncex,s=c2FsdA==,i=", "not a number"),
        ("r=cnoncex,s=c2FsdA==,i=-1", "not a number"),
        ("r=cnoncex,s=c2FsdA==,i=+5", "not a number"),
        ("r=cnoncex,s=c2FsdA==,i=0", "is 0"),
        ("r=cnoncex,s=c2FsdA==,i=10000001", "above the limit"),
        ("r=cnoncex,s=c2FsdA==,i=99999999999999999999", "above the limit"),
        ("r=cnoncex,s=c2FsdA==,i=64,", "extension"),
        ("r=cnonce x,s=c2FsdA==,i=64", "printable"),
    ];
    for (message, expected) in cases {
        let (client, _) = Client::with_nonce("alice", "cnonce");
        let text = malformed_text(client.respond(message, "pw"));
        assert!(text.contains(expected), "{message:?}: {text}");
    }
}

#[test]
fn malformed_client_final() {
    let proof = "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    let cases = [
        String::new(),
        "c=biws".into(),
        "c=biws,r=abcsnonce".into(),
        format!("r=abcsnonce,c=biws,{proof}"),
        format!("c=biws,{proof}"),
        format!("c=***,r=abcsnonce,{proof}"),
        "c=biws,r=abcsnonce,p=***".into(),
        "c=biws,r=abcsnonce,p=c2hvcnQ=".into(),
        "c=biws,r=abcsnonce,p=".into(),
        format!("c=biws,r=abcsnonce,{proof},x=1"),
        format!("c=biws,r=abcsnonce,,{proof}"),
    ];
    for message in cases {
        let (server, _) = server_for("n,,n=user,r=abc");
        malformed_text(server.finish(&message));
    }
}

#[test]
fn malformed_server_final() {
    let (client, client_first) = Client::with_nonce("alice", "cnonce");
    let (_, server_first) = server_for(&client_first);
    let (client, _) = client.respond(&server_first, "pw").unwrap();
    assert!(malformed_text(client.finish("")).contains("empty"));
    for message in ["x=1", "v=***", "v=c2hvcnQ=", "junk", "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=,"] {
        let (client, _) = Client::with_nonce("alice", "cnonce");
        let (client, _) = client.respond(&server_first, "pw").unwrap();
        malformed_text(client.finish(message));
    }
}

#[test]
fn user_names_with_commas_and_equals_round_trip() {
    let (_, message) = Client::with_nonce("a,b=c", "n");
    assert_eq!(message, "n,,n=a=2Cb=3Dc,r=n");
    let verifier = Verifier::derive("pw", b"salt", ITERATIONS);
    for user in ["a,b", "a=b", "=2C", ",=,", "=", "é☃ x", "=3D=2c"] {
        let (client, client_first) = Client::start(user);
        let first = parse_client_first(&client_first).unwrap();
        assert_eq!(first.user, user);
        let (server, server_first) = Server::start(first, &verifier);
        assert_eq!(server.user(), user);
        let (client, client_final) = client.respond(&server_first, "pw").unwrap();
        let done = server.finish(&client_final).unwrap();
        assert_eq!(done.user, user);
        client.finish(&done.server_final).unwrap();
    }
    // Lower-case escapes are the same escapes (ABNF strings ignore case).
    assert_eq!(parse_client_first("n,,n=a=2cb=3dc,r=n").unwrap().user, "a,b=c");
}

#[test]
fn verifier_matches_its_password_only() {
    let verifier = Verifier::derive("secret", b"salt", ITERATIONS);
    assert!(verifier.matches("secret"));
    assert!(!verifier.matches("Secret"));
    assert!(!verifier.matches(""));
}

#[test]
fn passwords_are_saslprepped() {
    // RFC 4013's examples: a soft hyphen maps to nothing, U+2168 (ROMAN NUMERAL NINE) to "IX".
    let verifier = Verifier::derive("IX", b"salt", ITERATIONS);
    assert!(verifier.matches("I\u{ad}X"));
    assert!(verifier.matches("\u{2168}"));
    assert_eq!(exchange("alice", "I\u{ad}X", &verifier).unwrap().user, "alice");
    // A password SASLprep refuses (a control character) still works as given.
    let verifier = Verifier::derive("bell\u{7}", b"salt", ITERATIONS);
    assert!(verifier.matches("bell\u{7}"));
    assert!(!verifier.matches("bell"));
    exchange("alice", "bell\u{7}", &verifier).unwrap();
}

#[test]
fn iteration_counts_are_clamped_to_what_clients_accept() {
    assert_eq!(Verifier::derive("pw", b"salt", 0).iterations, 1);
    assert_eq!(decoy_verifier("u", b"secret", u32::MAX).iterations, MAX_ITERATIONS);
}

#[test]
fn debug_output_hides_keys() {
    let verifier = Verifier::derive("pw", b"salt", ITERATIONS);
    let text = format!("{verifier:?}");
    assert!(!text.contains("stored_key") && !text.contains("server_key"), "{text}");
    let (server, _) = server_for("n,,n=user,r=abc");
    assert!(!format!("{server:?}").contains("key"));
}

#[test]
fn errors_read_as_sentences() {
    assert_eq!(ScramError::InvalidProof.to_string(), "authentication failed: unknown user or wrong password");
    assert!(ScramError::ChannelBindingUnsupported.to_string().contains("\"n,,\""));
}

/// Few enough cases that every property runs in well under a second in a debug build.
fn config() -> Config {
    Config { cases: 512, rng_seed: RngSeed::Fixed(0x0053_4352_414d), ..Config::default() }
}

/// Text shaped like SCRAM messages: short attributes with the characters that matter.
fn message_like() -> impl Strategy<Value = String> {
    prop::collection::vec("[a-zA-Z]?=?[a-zA-Z0-9+/=,% é\u{0}]{0,10}", 0..7).prop_map(|parts| parts.join(","))
}

fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), message_like()]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn parse_client_first_never_panics(text in any_text(), tail in any_text()) {
        let _ = parse_client_first(&text);
        let _ = parse_client_first(&format!("n,,n={text},r=abc{tail}"));
    }

    #[test]
    fn client_respond_never_panics(text in any_text(), salt in any_text(), iterations in "[0-9a-z+-]{0,3}") {
        let (client, _) = Client::with_nonce("user", "abc");
        let _ = client.respond(&text, "pw");
        // Past the nonce check, into salt and count parsing (counts kept small by the pattern).
        let (client, _) = Client::with_nonce("user", "abc");
        let _ = client.respond(&format!("r=abcd,s={salt},i={iterations}"), "pw");
    }

    #[test]
    fn server_finish_never_panics(text in any_text(), tail in any_text()) {
        let (server, _) = server_for("n,,n=user,r=abc");
        let _ = server.finish(&text);
        let (server, _) = server_for("n,,n=user,r=abc");
        let _ = server.finish(&format!("c=biws,r=abcsnonce{tail}"));
    }

    #[test]
    fn client_finish_never_panics(text in any_text()) {
        let (client, client_first) = Client::with_nonce("user", "abc");
        let (_, server_first) = server_for(&client_first);
        let (client, _) = client.respond(&server_first, "pw").expect("valid server-first");
        let _ = client.finish(&text);
    }

    #[test]
    fn any_user_name_round_trips(user in "(?s).{1,12}") {
        let (_, message) = Client::with_nonce(&user, "abc");
        let first = parse_client_first(&message);
        // NUL is the one character a saslname cannot carry.
        if user.contains('\0') {
            prop_assert!(first.is_err());
        } else {
            prop_assert_eq!(first.map(|f| f.user), Ok(user));
        }
    }
}
