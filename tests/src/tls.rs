//! A little PKI for TLS tests: a CA, a server certificate for 127.0.0.1 and
//! a client certificate, both signed by the CA, as PEM files.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Writes `ca.pem`, `server.pem`, `server-key.pem` (for 127.0.0.1 and
/// localhost), `client.pem` and `client-key.pem` into `dir`.
pub fn write_test_pki(dir: &Path) {
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "ferry test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |name: &str, purposes: Vec<ExtendedKeyUsagePurpose>, sans: Vec<String>| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(sans).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = purposes;
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &issuer).expect("signed");
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(
        "ferry test server",
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
    );
    let (client_cert, client_key) = leaf(
        "ferry",
        vec![ExtendedKeyUsagePurpose::ClientAuth],
        Vec::new(),
    );
    for (name, content) in [
        ("ca.pem", ca_cert.pem()),
        ("server.pem", server_cert),
        ("server-key.pem", server_key),
        ("client.pem", client_cert),
        ("client-key.pem", client_key),
    ] {
        std::fs::write(dir.join(name), content).expect("PEM written");
    }
}
