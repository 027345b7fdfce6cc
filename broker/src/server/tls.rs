//! TLS on the binary protocol: the acceptor built from the configured PEM files, the
//! handshake of one connection, and the user a verified client certificate names. HTTPS
//! (`http_tls`) gets its acceptor here too, from the same files.
//!
//! The crypto provider is rustls' `ring`, named explicitly rather than taken from the process
//! default, so that no other crate's choice of provider changes the broker's.
//!
//! Memory: besides the connection's outbox (bounded by `Outbox::HIGH_WATER`), rustls holds at
//! most its default buffer limit (64 KiB) of encrypted records not yet on the socket, and one
//! record (16 KiB and a little) being read.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::error::StartError;
use crate::session::Transport;

/// Builds the TLS listener's acceptor from `config`'s certificate, key and (for mutual TLS)
/// client CA files. Every failure is one line naming the file.
pub(crate) fn acceptor(config: &Config) -> Result<TlsAcceptor, StartError> {
    let server = server_config(config, config.tls_client_ca.as_deref(), "tls_listen")?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// Builds the HTTPS listener's acceptor: the TLS listener's certificate and key, and no client
/// certificates, even with a client CA configured. HTTP requests log in with Basic auth or a
/// token, and a browser asked for a certificate it does not have shows the operator an error
/// page instead of the dashboard's login.
pub(crate) fn https_acceptor(config: &Config) -> Result<TlsAcceptor, StartError> {
    let mut server = server_config(config, None, "http_tls")?;
    // The listener serves HTTP/1.1 only; saying so lets a client that offers h2 fall back
    // during the handshake rather than fail on its first frame.
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// The server side of TLS with `config`'s certificate and key, requiring client certificates
/// that chain to `client_ca` when given. `setting` names what needs the certificate, for the
/// error when there is none.
fn server_config(
    config: &Config,
    client_ca: Option<&Path>,
    setting: &str,
) -> Result<ServerConfig, StartError> {
    let (Some(cert_path), Some(key_path)) = (&config.tls_cert, &config.tls_key) else {
        return Err(StartError::Config(format!("{setting} needs tls_cert and tls_key")));
    };
    let certs = load_certs(cert_path, "TLS certificate")?;
    let key = load_key(key_path)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| StartError::Config(format!("TLS: {e}")))?;
    let builder = match client_ca {
        Some(ca_path) => {
            let mut roots = RootCertStore::empty();
            for cert in load_certs(ca_path, "TLS client CA")? {
                roots.add(cert).map_err(|e| file_error("TLS client CA", ca_path, e))?;
            }
            // Required, not optional: a listener set up for client certificates is refused to
            // clients without one at the TLS level, before a single frame is read.
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| file_error("TLS client CA", ca_path, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    builder.with_single_cert(certs, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => StartError::Config(format!(
            "TLS key file {} does not match the certificate in {}",
            key_path.display(),
            cert_path.display()
        )),
        other => file_error("TLS key", key_path, other),
    })
}

/// Runs the server side of the TLS handshake, within `timeout` and until shutdown. `None`
/// when it failed (logged: a client that does not trust us, a port scanner) or was cut short.
pub(crate) async fn handshake(
    acceptor: TlsAcceptor,
    socket: TcpStream,
    peer: SocketAddr,
    conn_id: u64,
    timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> Option<(TlsStream<TcpStream>, Transport)> {
    let accepted = tokio::select! {
        accepted = tokio::time::timeout(timeout, acceptor.accept(socket)) => accepted,
        _ = shutdown.wait_for(|stopping| *stopping) => return None,
    };
    let stream = match accepted {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            tracing::info!(conn_id, %peer, error = %err, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            tracing::info!(conn_id, %peer, "no TLS handshake in time; closing");
            return None;
        }
    };
    // rustls only hands out certificates it verified against the client CA.
    let certificate = stream.get_ref().1.peer_certificates().and_then(|chain| chain.first());
    let certificate_user = certificate.and_then(|cert| {
        let user = certificate_user(cert);
        if user.is_none() {
            tracing::info!(conn_id, %peer, "the client certificate names no user (no subject CN, no DNS name)");
        }
        user
    });
    Some((stream, Transport { tls: true, certificate_user }))
}

/// The user a certificate stands for: its subject's common name, or else its first DNS name.
pub(crate) fn certificate_user(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let common_name = cert.subject().iter_common_name().find_map(|cn| cn.as_str().ok().map(str::to_owned));
    common_name.filter(|cn| !cn.is_empty()).or_else(|| {
        let names = cert.subject_alternative_name().ok().flatten()?;
        names.value.general_names.iter().find_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(dns) => Some(dns.to_string()),
            _ => None,
        })
    })
}

/// Every certificate of a PEM file; none is an error.
fn load_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, StartError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(what, path, e))?;
    if certs.is_empty() {
        return Err(StartError::Config(format!(
            "{what} file {}: no certificate in it (expected PEM '-----BEGIN CERTIFICATE-----' blocks)",
            path.display()
        )));
    }
    Ok(certs)
}

/// The first private key of a PEM file, in any of the encodings rustls reads.
fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, StartError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => StartError::Config(format!(
            "TLS key file {}: no private key in it (expected a PEM 'PRIVATE KEY' block)",
            path.display()
        )),
        other => pem_error("TLS key", path, other),
    })
}

fn pem_error(what: &str, path: &Path, err: rustls::pki_types::pem::Error) -> StartError {
    match err {
        rustls::pki_types::pem::Error::Io(io) => {
            StartError::Config(format!("{what} file {}: cannot read it: {io}", path.display()))
        }
        other => file_error(what, path, format!("not valid PEM: {other}")),
    }
}

fn file_error(what: &str, path: &Path, err: impl std::fmt::Display) -> StartError {
    StartError::Config(format!("{what} file {}: {err}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(params: rcgen::CertificateParams) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn named(cn: Option<&str>, dns: &[&str]) -> CertificateDer<'static> {
        let mut params =
            rcgen::CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        }
        let (pem, _) = self_signed(params);
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    #[test]
    fn the_user_is_the_common_name_else_the_first_dns_name() {
        assert_eq!(certificate_user(&named(Some("alice"), &["bob.example"])).as_deref(), Some("alice"));
        assert_eq!(
            certificate_user(&named(None, &["bob.example", "c.example"])).as_deref(),
            Some("bob.example")
        );
        assert_eq!(certificate_user(&named(None, &[])), None);
        assert_eq!(certificate_user(&CertificateDer::from(vec![1, 2, 3])), None, "garbage names nobody");
    }

    /// A configuration whose certificate and key files, in a directory of their own, hold
    /// `cert` and `key`.
    fn config_with(cert: &str, key: &str) -> (tempfile::TempDir, Config) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert).unwrap();
        std::fs::write(dir.path().join("key.pem"), key).unwrap();
        let config = Config {
            tls_listen: "127.0.0.1:0".into(),
            tls_cert: Some(dir.path().join("cert.pem")),
            tls_key: Some(dir.path().join("key.pem")),
            ..Config::default()
        };
        (dir, config)
    }

    #[test]
    fn good_files_make_an_acceptor_and_bad_ones_one_line_naming_the_file() {
        let (cert, key) = self_signed(rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap());
        let (_, other_key) = self_signed(rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap());
        let (_dir, good) = config_with(&cert, &key);
        assert!(acceptor(&good).is_ok());
        assert!(https_acceptor(&good).is_ok());

        let missing = good.tls_cert.as_ref().map(|cert| cert.with_file_name("missing.pem"));
        let missing_ca = Config { tls_client_ca: missing, ..good.clone() };
        assert!(https_acceptor(&missing_ca).is_ok(), "HTTPS asks for no client certificate");
        let cases = [
            (config_with("not pem", &key), "cert.pem: no certificate"),
            (config_with(&cert, "not pem"), "key.pem: no private key"),
            (config_with(&cert, &other_key), "does not match the certificate"),
        ];
        let cases = cases
            .into_iter()
            .map(|((dir, config), expected)| (Some(dir), config, expected))
            .chain([(None, missing_ca, "missing.pem: cannot read it")]);
        for (_dir, config, expected) in cases {
            let error = acceptor(&config).err().expect("refused").to_string();
            assert!(error.contains(expected), "{error}");
            assert_eq!(error.lines().count(), 1, "{error}");
        }
    }
}
