//! TLS under a connection: the rustls client configuration built from [`TlsOptions`], the
//! handshake, and TLS failures explained in words.
//!
//! The crypto provider is rustls' `ring`, named explicitly rather than taken from the process
//! default, so an application that installs another default does not change this client.

use std::io;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::error::{Error, Result};
use crate::options::TlsOptions;

/// Runs the TLS handshake over `stream` as `options` say.
pub(crate) async fn connect(stream: TcpStream, options: &TlsOptions) -> Result<TlsStream<TcpStream>> {
    let server_name = ServerName::try_from(options.server_name.clone()).map_err(|_| {
        invalid_input(format!(
            "TLS server name '{}' is neither a DNS name nor an IP address",
            options.server_name
        ))
    })?;
    let connector = TlsConnector::from(Arc::new(client_config(options)?));
    connector.connect(server_name, stream).await.map_err(|err| Error::Io(explain(err, &options.server_name)))
}

/// The rustls configuration: trusted roots, and the client certificate if there is one.
fn client_config(options: &TlsOptions) -> Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    match &options.ca_certificates {
        Some(pem) => {
            for cert in certificates(pem, "TLS CA certificates")? {
                roots.add(cert).map_err(|e| invalid_input(format!("TLS CA certificate: {e}")))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid_input(format!("TLS: {e}")))?
        .with_root_certificates(roots);
    match &options.client_certificate {
        Some(client) => {
            let chain = certificates(&client.cert_pem, "TLS client certificate")?;
            let key = PrivateKeyDer::from_pem_slice(&client.key_pem)
                .map_err(|e| invalid_input(format!("TLS client key: no PEM private key ({e})")))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| match e {
                rustls::Error::InconsistentKeys(_) => {
                    invalid_input("TLS client key does not match the client certificate".into())
                }
                other => invalid_input(format!("TLS client certificate: {other}")),
            })
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

/// Every certificate of a PEM text; none is an error.
fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid_input(format!("{what}: not valid PEM ({e})")))?;
    if certs.is_empty() {
        return Err(invalid_input(format!("{what}: no PEM certificate found")));
    }
    Ok(certs)
}

fn invalid_input(message: String) -> Error {
    Error::Io(io::Error::new(io::ErrorKind::InvalidInput, message))
}

/// The error as the user should read it: what a TLS failure means for this connection, with
/// rustls' own words after it. Other errors pass through unchanged.
pub(crate) fn explain(err: io::Error, server_name: &str) -> io::Error {
    let Some(tls) = err.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) else {
        return err;
    };
    let meaning = match tls {
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "the broker's certificate is not signed by a CA this client trusts".to_string()
        }
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!("the broker's certificate is not valid for '{server_name}'"),
        rustls::Error::InvalidCertificate(_) => "the broker's certificate is not acceptable".to_string(),
        rustls::Error::AlertReceived(AlertDescription::CertificateRequired) => {
            "the broker requires a client certificate (mutual TLS)".to_string()
        }
        rustls::Error::AlertReceived(
            AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown,
        ) => "the broker refused this client's certificate".to_string(),
        rustls::Error::InvalidMessage(_) => {
            "the broker did not answer in TLS (is this its TLS port, hopperd --tls-listen?)".to_string()
        }
        _ => format!("TLS with '{server_name}' failed"),
    };
    io::Error::new(err.kind(), format!("{meaning}: {tls}"))
}
