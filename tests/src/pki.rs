//! Throwaway certificate authorities for the TLS and HTTPS tests: a CA of its own per test, and
//! the broker and client certificates it signs, as PEM files in a temporary directory.

use std::path::{Path, PathBuf};

use hopper_client::{ClientCertificate, TlsOptions};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    IsCa, KeyPair,
};
use tempfile::TempDir;

/// A CA of its own and the files it signed, in a temporary directory.
pub struct Pki {
    dir: TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    /// A new CA named after `name`; its certificate is written to [`Pki::ca_path`].
    pub fn new(name: &str) -> Pki {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("generate a key"))
            .expect("self-sign the CA");
        let pki = Pki { dir: tempfile::tempdir().expect("create a temporary directory"), ca };
        std::fs::write(pki.ca_path(), pki.ca.pem()).expect("write the CA certificate");
        pki
    }

    /// The directory holding the CA's files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA's certificate as a PEM file.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The CA's certificate in PEM.
    pub fn ca_pem(&self) -> Vec<u8> {
        self.ca.pem().into_bytes()
    }

    /// Signs a certificate for `common_name` and the names in `sans`, for `purpose`; writes
    /// `<file>.pem` and `<file>.key` and returns their paths.
    pub fn sign(
        &self,
        file: &str,
        common_name: &str,
        sans: &[&str],
        purpose: ExtendedKeyUsagePurpose,
    ) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("valid subject alternative names");
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![purpose];
        let key = KeyPair::generate().expect("generate a key");
        let cert = params.signed_by(&key, &self.ca).expect("sign the certificate");
        let (cert_path, key_path) =
            (self.dir.path().join(format!("{file}.pem")), self.dir.path().join(format!("{file}.key")));
        std::fs::write(&cert_path, cert.pem()).expect("write the certificate");
        std::fs::write(&key_path, key.serialize_pem()).expect("write the key");
        (cert_path, key_path)
    }

    /// The broker's certificate, valid for localhost and 127.0.0.1.
    pub fn server(&self) -> (PathBuf, PathBuf) {
        self.sign("server", "localhost", &["localhost", "127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate whose subject CN is `user`.
    pub fn client(&self, user: &str) -> ClientCertificate {
        let (cert, key) =
            self.sign(&format!("client-{user}"), user, &[], ExtendedKeyUsagePurpose::ClientAuth);
        ClientCertificate {
            cert_pem: std::fs::read(cert).expect("read the certificate"),
            key_pem: std::fs::read(key).expect("read the key"),
        }
    }

    /// TLS to the test broker, trusting this CA only.
    pub fn tls(&self) -> TlsOptions {
        TlsOptions { ca_certificates: Some(self.ca_pem()), ..TlsOptions::new("localhost") }
    }
}

/// A temporary path as a command-line argument.
pub fn path_arg(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}
