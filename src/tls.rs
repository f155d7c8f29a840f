//! TLS to PostgreSQL, as libpq's `sslmode` and `sslrootcert` describe it, for both the SQL
//! connections (tokio-postgres) and the replication connection (pgwire-replication).
//!
//! tokio-postgres understands only `disable`, `prefer` and `require`, and no `sslrootcert`,
//! so [`split`] takes both parameters out of `--database-url` before tokio-postgres parses
//! the rest, and the connector built here does what the mode asks:
//!
//! | sslmode | encrypted | certificate chain | host name |
//! |---|---|---|---|
//! | `disable` | no | | |
//! | `prefer` (default) | when the server offers it | not checked | not checked |
//! | `require` | yes | not checked | not checked |
//! | `verify-ca` | yes | checked | not checked (see below) |
//! | `verify-full` | yes | checked | checked (an IP host against the IP SANs) |
//!
//! The chain is checked against `sslrootcert` (a PEM file) when given, else the Mozilla
//! roots. `sslcert` and `sslkey` give a client certificate, for servers that authenticate
//! clients by certificate. libpq's defaults under `~/.postgresql/` are not read.
//!
//! `verify-ca` on the replication connection: pgwire-replication 0.5 checks the host name in
//! that mode too (it misses the error variant rustls 0.23.46 reports). So the SQL
//! connections, which always connect first, note a DNS name the (chain-checked) certificate
//! lists, and the replication connection checks chain and that name: any certificate of the
//! trusted CAs for the server's own name, whatever host the URL gives.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl Mode {
    fn parse(value: &str) -> Result<Mode, String> {
        Ok(match value {
            "disable" => Mode::Disable,
            "prefer" => Mode::Prefer,
            "require" => Mode::Require,
            "verify-ca" => Mode::VerifyCa,
            "verify-full" => Mode::VerifyFull,
            "allow" => {
                return Err("--database-url: sslmode=allow is not supported (it tries without TLS first); use prefer, require, verify-ca or verify-full".into())
            }
            other => {
                return Err(format!(
                    "--database-url: sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
                ))
            }
        })
    }

    /// What tokio-postgres is told: whether TLS is tried, and whether it is required.
    pub fn for_tokio_postgres(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode;
        match self {
            Mode::Disable => SslMode::Disable,
            Mode::Prefer => SslMode::Prefer,
            Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
        }
    }

    /// What pgwire-replication is told.
    fn for_replication(self) -> pgwire_replication::SslMode {
        use pgwire_replication::SslMode;
        match self {
            Mode::Disable => SslMode::Disable,
            Mode::Prefer => SslMode::Prefer,
            Mode::Require => SslMode::Require,
            // With the certificate's own name to check (see the module's comment).
            Mode::VerifyCa | Mode::VerifyFull => SslMode::VerifyFull,
        }
    }
}

/// The TLS settings of a `--database-url`.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub mode: Mode,
    /// `sslrootcert`: trusted CA certificates (PEM).
    pub root_cert: Option<PathBuf>,
    /// `sslcert` and `sslkey`: a client certificate chain and its private key (PEM), for
    /// servers that authenticate clients by certificate.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// `verify-ca`: a DNS name the server's certificate lists, noted by the SQL connections'
    /// handshakes, for the replication connection to check.
    server_name: Arc<Mutex<Option<String>>>,
}

impl Settings {
    /// The replication connection's TLS settings, for a connection to `host`.
    pub fn for_replication(&self, host: &str) -> pgwire_replication::TlsConfig {
        // pgwire-replication refuses verify-full to an IP address unless told the name to
        // check; the address itself is that name (rustls then matches the IP SANs).
        let by_ip = || {
            host.parse::<std::net::IpAddr>()
                .is_ok()
                .then(|| host.to_string())
        };
        let sni_hostname = match self.mode {
            Mode::VerifyFull => by_ip(),
            Mode::VerifyCa => self
                .server_name
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .or_else(by_ip),
            _ => None,
        };
        pgwire_replication::TlsConfig {
            mode: self.mode.for_replication(),
            // Only ever set with verify-ca or verify-full (see `split`): pgwire-replication
            // would read the file in every mode.
            ca_pem_path: self.root_cert.clone(),
            sni_hostname,
            client_cert_pem_path: self.client_cert.as_ref().map(|(cert, _)| cert.clone()),
            client_key_pem_path: self.client_cert.as_ref().map(|(_, key)| key.clone()),
        }
    }

    /// The SQL connections' TLS connector. Reads `sslrootcert` when the mode checks
    /// certificates; a file that cannot be read is an error naming it.
    pub fn connector(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match self.mode {
            Mode::Disable | Mode::Prefer | Mode::Require => Arc::new(AnyCertificate {
                provider: Arc::clone(&provider),
            }),
            Mode::VerifyCa | Mode::VerifyFull => {
                let webpki = WebPkiServerVerifier::builder_with_provider(
                    Arc::new(self.roots()?),
                    Arc::clone(&provider),
                )
                .build()
                .map_err(|e| format!("--database-url: cannot check certificates: {e}"))?;
                if self.mode == Mode::VerifyCa {
                    Arc::new(ChainOnly {
                        inner: webpki,
                        server_name: Arc::clone(&self.server_name),
                    })
                } else {
                    webpki
                }
            }
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("--database-url: cannot set up TLS: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match &self.client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let (chain, key) = read_client_certificate(cert, key)?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    format!(
                        "--database-url: sslcert {} and sslkey {} do not make a client certificate ({e}); give the certificate and its own private key",
                        self.client_cert.as_ref().map_or(String::new(), |(c, _)| c.display().to_string()),
                        self.client_cert.as_ref().map_or(String::new(), |(_, k)| k.display().to_string()),
                    )
                })?
            }
        };
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
    }

    fn roots(&self) -> Result<RootCertStore, String> {
        let mut roots = RootCertStore::empty();
        match &self.root_cert {
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            Some(path) => {
                let certs = read_certificates("sslrootcert", path)?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(format!(
                        "--database-url: sslrootcert {} holds no usable CA certificate; give a PEM file with the server's CA certificate",
                        path.display()
                    ));
                }
            }
        }
        Ok(roots)
    }

    /// Reads `sslrootcert`, `sslcert` and `sslkey` now, so that a missing file is a
    /// start-up error, not a connection failure later.
    pub fn check(&self) -> Result<(), String> {
        if let Some(path) = &self.root_cert {
            read_certificates("sslrootcert", path)?;
        }
        if let Some((cert, key)) = &self.client_cert {
            read_client_certificate(cert, key)?;
        }
        Ok(())
    }
}

fn read_certificates(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let fail = |e: &dyn std::fmt::Display| {
        format!(
            "--database-url: cannot read {what} {}: {e}; give a readable PEM file of certificates",
            path.display()
        )
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| fail(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(&e))?;
    if certs.is_empty() {
        return Err(fail(&"no certificate in it"));
    }
    Ok(certs)
}

/// The client certificate chain (`sslcert`) and its private key (`sslkey`).
fn read_client_certificate(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let chain = read_certificates("sslcert", cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!(
            "--database-url: cannot read sslkey {}: {e}; give a readable PEM file with the client certificate's private key (PKCS#8, PKCS#1 or SEC1)",
            key.display()
        )
    })?;
    Ok((chain, key))
}

/// Takes `sslmode`, `sslrootcert`, `sslcert` and `sslkey` out of a connection string (URI or
/// `key=value` form): returns the rest, for tokio-postgres, and the TLS settings.
pub fn split(url: &str) -> Result<(String, Settings), String> {
    let mut settings = Settings::default();
    let (mut cert, mut key) = (None, None);
    let mut take = |name: &str, value: &str| -> Result<bool, String> {
        match name {
            "sslmode" => settings.mode = Mode::parse(value)?,
            "sslrootcert" => settings.root_cert = Some(PathBuf::from(value)),
            "sslcert" => cert = Some(PathBuf::from(value)),
            "sslkey" => key = Some(PathBuf::from(value)),
            _ => return Ok(false),
        }
        Ok(true)
    };
    let rest = if let Some(after) = url
        .strip_prefix("postgresql://")
        .or_else(|| url.strip_prefix("postgres://"))
    {
        // As tokio-postgres reads it: credentials run to the first `@` (a password may
        // hold a `?`), the query starts at the first `?` after them.
        let from = url.len() - after.len() + after.find('@').map_or(0, |at| at + 1);
        match url[from..].find('?') {
            None => url.to_string(),
            Some(at) => {
                let (base, query) = (&url[..from + at], &url[from + at + 1..]);
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    if !take(&percent_decode(key), &percent_decode(value))? {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() {
                    base.to_string()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = String::new();
        for (start, end, key, value) in key_values(url) {
            if !take(&key, &value)? {
                if !kept.is_empty() {
                    kept.push(' ');
                }
                kept.push_str(&url[start..end]);
            }
        }
        kept
    };
    settings.client_cert = match (cert, key) {
        (None, None) => None,
        (Some(cert), Some(key)) if settings.mode != Mode::Disable => Some((cert, key)),
        (Some(_), Some(_)) => {
            return Err("--database-url: sslcert and sslkey are given but sslmode=disable; use require, verify-ca or verify-full".into())
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err("--database-url: sslcert and sslkey go together (the client certificate and its private key); give both, or neither".into())
        }
    };
    if let Some(root) = &settings.root_cert {
        if !matches!(settings.mode, Mode::VerifyCa | Mode::VerifyFull) {
            return Err(
                "--database-url: sslrootcert is given but sslmode is not verify-ca or verify-full, so no certificate would be checked against it (libpq would check the chain); add sslmode=verify-full (or verify-ca), or drop sslrootcert"
                .into());
        }
        if root.as_os_str() == "system" {
            return Err("--database-url: sslrootcert=system is not supported; leave sslrootcert out to check against the Mozilla roots, or give a PEM file".into());
        }
    }
    Ok((rest, settings))
}

/// The `key = value` pairs of a libpq keyword/value string, with the byte span each takes
/// (values may be single-quoted, with `\` escapes).
fn key_values(text: &str) -> Vec<(usize, usize, String, String)> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let skip_space = |i: &mut usize| {
        while *i < bytes.len() && bytes[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_space(&mut i);
        if i >= bytes.len() {
            return out;
        }
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = text[start..i].to_string();
        skip_space(&mut i);
        if i < bytes.len() && bytes[i] == b'=' {
            i += 1;
        }
        skip_space(&mut i);
        let mut value = String::new();
        if i < bytes.len() && bytes[i] == b'\'' {
            i += 1;
            let mut chars = text[i..].char_indices();
            let mut end = text.len() - i;
            while let Some((at, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    '\'' => {
                        end = at + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            i += end;
        } else {
            // Unquoted: up to white space; `\` takes the next character as it is.
            let mut chars = text[i..].char_indices();
            let mut end = text.len() - i;
            while let Some((at, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    c if c.is_whitespace() => {
                        end = at;
                        break;
                    }
                    c => value.push(c),
                }
            }
            i += end;
        }
        out.push((start, i, key, value));
    }
}

/// `%XX` escapes of a URI component decoded (invalid escapes are kept as they are).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `require` and `prefer` on the SQL connections: any certificate (libpq's meaning:
/// encrypted, not authenticated); the handshake's signatures are still checked (the
/// replication client's own verifier for these modes does not check them either).
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `verify-ca` on the SQL connections: the chain is checked, the host name is not; a DNS
/// name the certificate lists is noted for the replication connection.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
    server_name: Arc<Mutex<Option<String>>>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        if let Some(name) = certificate_name(end_entity) {
            *self.server_name.lock().unwrap_or_else(|e| e.into_inner()) = Some(name);
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A DNS name `certificate` is valid for: its first listed name, a wildcard's `*` made a
/// label of its own.
fn certificate_name(certificate: &CertificateDer<'_>) -> Option<String> {
    let parsed = webpki::EndEntityCert::try_from(certificate).ok()?;
    let name = parsed.valid_dns_names().next()?;
    Some(match name.strip_prefix("*.") {
        Some(domain) => format!("walhook.{domain}"),
        None => name.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_parameters_are_taken_out_and_the_rest_kept() {
        let (rest, tls) = split(
            "postgresql://u:p@127.0.0.1:5432/db?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=3",
        )
        .expect("split");
        assert_eq!(
            rest,
            "postgresql://u:p@127.0.0.1:5432/db?application_name=x&connect_timeout=3"
        );
        assert_eq!(tls.mode, Mode::VerifyFull);
        assert_eq!(tls.root_cert, Some(PathBuf::from("/etc/ca.pem")));

        let (rest, tls) = split("postgres://u@h/db?sslmode=require").expect("split");
        assert_eq!(rest, "postgres://u@h/db");
        assert_eq!(tls.mode, Mode::Require);
        let (rest, tls) = split("postgres://u@h/db").expect("split");
        assert_eq!(
            (rest.as_str(), tls.mode),
            ("postgres://u@h/db", Mode::Prefer)
        );
    }

    #[test]
    fn keyword_parameters_are_taken_out_and_the_rest_kept() {
        let (rest, tls) = split(
            "host=127.0.0.1 sslmode = verify-full user=walhook sslrootcert='/my dir/ca\\'s.pem' dbname=app",
        )
        .expect("split");
        assert_eq!(rest, "host=127.0.0.1 user=walhook dbname=app");
        assert_eq!(tls.mode, Mode::VerifyFull);
        assert_eq!(tls.root_cert, Some(PathBuf::from("/my dir/ca's.pem")));
    }

    #[test]
    fn unknown_and_unsupported_modes_are_refused_with_the_choices() {
        let e = split("postgres://u@h/db?sslmode=strict").expect_err("strict");
        assert!(e.contains("verify-full"), "{e}");
        let e = split("host=h sslmode=allow").expect_err("allow");
        assert!(e.contains("not supported"), "{e}");
        let (_, tls) = split("postgres://u@h/db?sslmode=verify-ca").expect("verify-ca");
        assert_eq!(tls.mode, Mode::VerifyCa);
    }

    #[test]
    fn a_missing_root_certificate_file_is_named() {
        let tls = Settings {
            mode: Mode::VerifyFull,
            root_cert: Some(PathBuf::from("/nonexistent/ca.pem")),
            ..Settings::default()
        };
        let e = tls.check().expect_err("missing file");
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        assert!(tls.connector().is_err());
    }

    #[test]
    fn a_root_certificate_without_verify_full_is_refused() {
        // libpq would check the chain against it under require; walhook would not.
        for url in [
            "postgres://u@h/db?sslmode=require&sslrootcert=/ca.pem",
            "host=h sslrootcert=/ca.pem",
        ] {
            let e = split(url).expect_err(url);
            assert!(e.contains("verify-full"), "{e}");
        }
        let e =
            split("postgres://u@h/db?sslmode=verify-full&sslrootcert=system").expect_err("system");
        assert!(e.contains("system"), "{e}");
    }

    #[test]
    fn a_client_certificate_takes_both_files_and_tls() {
        let (rest, tls) =
            split("postgresql://u@h/db?sslmode=require&sslcert=/c.pem&sslkey=/k.pem&x=1")
                .expect("split");
        assert_eq!(rest, "postgresql://u@h/db?x=1");
        assert_eq!(
            tls.client_cert,
            Some((PathBuf::from("/c.pem"), PathBuf::from("/k.pem")))
        );
        let e = split("host=h sslcert=/c.pem").expect_err("no key");
        assert!(e.contains("sslkey"), "{e}");
        let e = split("host=h sslmode=disable sslcert=/c.pem sslkey=/k.pem").expect_err("disable");
        assert!(e.contains("disable"), "{e}");
        let e = tls.check().expect_err("missing files");
        assert!(e.contains("sslcert /c.pem"), "{e}");
    }

    #[test]
    fn a_question_mark_or_backslash_in_the_password_does_not_hide_sslmode() {
        let (rest, tls) = split("postgresql://walhook:p?ss@db/app?sslmode=require").expect("split");
        assert_eq!(rest, "postgresql://walhook:p?ss@db/app");
        assert_eq!(tls.mode, Mode::Require);
        let (rest, tls) = split(r"host=db password=a\ b sslmode=verify-full").expect("split");
        assert_eq!(rest, r"host=db password=a\ b");
        assert_eq!(tls.mode, Mode::VerifyFull);
    }
}
