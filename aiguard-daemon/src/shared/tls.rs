//! TLS for `rediss://`: the PEM files `[store]` names (`tls_ca`, `tls_cert`, `tls_key`), read
//! and checked into what the Redis client trusts and presents; and failed handshakes told in
//! words an operator can act on.
//!
//! The redis crate (rustls) trusts the system's roots unless it is given CAs: `tls_ca` then
//! replaces them (as `redis-cli --cacert` and `curl --cacert` do), so that a private CA's
//! Redis is trusted and no public CA can stand in for it.
use std::{error::Error, path::Path, sync::Arc};

use redis::{ClientTlsConfig, RedisError, TlsCertificates};
use rustls::{
    AlertDescription, CertificateError, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    sign::CertifiedKey,
};

use super::settings::StoreSettings;
use crate::config::{ConfigError, invalid};

/// Reads and checks the TLS files of `settings`; `None` when none is set (the system's roots,
/// no client certificate). Every error names the field and its path.
pub fn certificates(settings: &StoreSettings) -> Result<Option<TlsCertificates>, ConfigError> {
    let root_cert = match &settings.tls_ca {
        Some(path) => Some(ca_bundle(path)?),
        None => None,
    };
    let client_tls = match (&settings.tls_cert, &settings.tls_key) {
        (None, None) => None,
        (Some(cert), None) => {
            return Err(invalid(
                "store.tls_key",
                "(not set)",
                &format!(
                    "the PEM private key of store.tls_cert = {}: a client certificate needs its key",
                    shown(cert)
                ),
            ));
        }
        (None, Some(key)) => {
            return Err(invalid(
                "store.tls_cert",
                "(not set)",
                &format!(
                    "the PEM client certificate whose key is store.tls_key = {}",
                    shown(key)
                ),
            ));
        }
        (Some(cert), Some(key)) => Some(client_identity(cert, key)?),
    };
    if root_cert.is_none() && client_tls.is_none() {
        return Ok(None);
    }
    Ok(Some(TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// A path as an error message shows it: quoted.
fn shown(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

fn read(field: &str, path: &Path, what: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| {
        invalid(
            field,
            shown(path),
            &format!("a readable file holding {what} (reading it failed: {e})"),
        )
    })
}

/// Certificates of a PEM file; an error (naming `field`) when it holds none or a broken one.
fn pem_certificates(
    field: &str,
    path: &Path,
    pem: &[u8],
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            invalid(
                field,
                shown(path),
                &format!("{what} in PEM (the file is not valid PEM: {e})"),
            )
        })?;
    if certs.is_empty() {
        let hint = if contains(pem, b"PRIVATE KEY-----") {
            " (it holds a private key)"
        } else {
            ""
        };
        return Err(invalid(
            field,
            shown(path),
            &format!(
                "{what} in PEM (\"-----BEGIN CERTIFICATE-----\" blocks): the file has none{hint}"
            ),
        ));
    }
    Ok(certs)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `tls_ca`: every certificate in it must be usable as a trust anchor.
fn ca_bundle(path: &Path) -> Result<Vec<u8>, ConfigError> {
    const FIELD: &str = "store.tls_ca";
    const WHAT: &str = "the CA certificates to trust";
    let pem = read(FIELD, path, WHAT)?;
    let mut roots = RootCertStore::empty();
    for (i, cert) in pem_certificates(FIELD, path, &pem, WHAT)?
        .into_iter()
        .enumerate()
    {
        roots.add(cert).map_err(|e| {
            invalid(
                FIELD,
                shown(path),
                &format!(
                    "{WHAT} in PEM: certificate {} of the file is not a usable X.509 certificate ({e})",
                    i + 1
                ),
            )
        })?;
    }
    Ok(pem)
}

/// `tls_cert` and `tls_key`: a chain, and the unencrypted key of its first certificate.
fn client_identity(cert: &Path, key: &Path) -> Result<ClientTlsConfig, ConfigError> {
    let cert_pem = read(
        "store.tls_cert",
        cert,
        "this node's client certificate (chain)",
    )?;
    let chain = pem_certificates(
        "store.tls_cert",
        cert,
        &cert_pem,
        "this node's client certificate (chain)",
    )?;
    let key_pem = read("store.tls_key", key, "the private key of store.tls_cert")?;
    let der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        let why = if contains(&key_pem, b"ENCRYPTED PRIVATE KEY-----") {
            "the key is encrypted".to_owned()
        } else if matches!(e, rustls::pki_types::pem::Error::NoItemsFound) {
            let hint = if contains(&key_pem, b"CERTIFICATE-----") {
                " (it holds a certificate)"
            } else {
                ""
            };
            format!("the file has no \"-----BEGIN PRIVATE KEY-----\" (or RSA or EC PRIVATE KEY) block{hint}")
        } else {
            format!("the file is not valid PEM: {e}")
        };
        invalid(
            "store.tls_key",
            shown(key),
            &format!("an unencrypted PEM private key (PKCS#8, RSA or EC): {why}"),
        )
    })?;
    // What rustls will do with them when it connects, done now: a key it cannot sign with, or
    // one that is not the certificate's, is refused here rather than at every connection.
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, der, &provider).map_err(|e| {
        let why = match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "the private key of store.tls_cert = {}: this key is not that certificate's",
                shown(cert)
            ),
            e => format!("a private key this node can sign with ({e})"),
        };
        invalid("store.tls_key", shown(key), &why)
    })?;
    Ok(ClientTlsConfig {
        client_cert: cert_pem,
        client_key: key_pem,
    })
}

/// A Redis error in words: a failed TLS handshake says what is wrong and which setting fixes
/// it (followed by the error itself); any other error as it is.
pub fn explain(e: &RedisError) -> String {
    let Some(tls) = tls_error(e) else {
        return e.to_string();
    };
    let why = match tls {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => {
                "the server's TLS certificate is not trusted: no CA this node trusts signed it \
                 (store.tls_ca names the PEM file of the CAs to trust; without it, the system's)"
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "the server's TLS certificate is not valid for the host named in store.urls"
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the server's TLS certificate has expired"
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the server's TLS certificate is not valid yet (is this node's clock right?)"
            }
            CertificateError::Revoked => "the server's TLS certificate is revoked",
            _ => "the server's TLS certificate is refused",
        },
        rustls::Error::AlertReceived(AlertDescription::CertificateRequired) => {
            "the server requires a client certificate: set store.tls_cert and store.tls_key"
        }
        rustls::Error::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateRevoked,
        ) => {
            "the server refused this node's client certificate (store.tls_cert): is it signed by \
             a CA the server trusts, and still valid?"
        }
        _ => "the TLS handshake with the server failed",
    };
    format!("{why} ({e})")
}

/// The rustls error somewhere in `e`'s chain. The redis crate keeps its cause behind an `Arc`,
/// and an I/O error keeps its own inside, where `source()` does not look.
fn tls_error<'a>(e: &'a (dyn Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(e);
    // A bound against a chain that loops.
    for _ in 0..16 {
        let err = next?;
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        let inner: Option<&(dyn Error + 'static)> =
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                io.get_ref().map(|e| e as &(dyn Error + 'static))
            } else if let Some(arc) = err.downcast_ref::<Arc<dyn Error + Send + Sync>>() {
                Some(&**arc as &(dyn Error + 'static))
            } else {
                None
            };
        if let Some(tls) = inner.and_then(tls_error) {
            return Some(tls);
        }
        next = err.source();
    }
    None
}
