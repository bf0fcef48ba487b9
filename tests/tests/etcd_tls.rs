//! etcd over TLS against real etcd members serving HTTPS only: a CA, a
//! member certificate for 127.0.0.1 and a client certificate made by the
//! test, passed to ferry as files (`--etcd-ca-file`, `--etcd-cert-file`,
//! `--etcd-key-file`). With them, extract and restore work; without the CA,
//! or without a client certificate where the member demands one, ferry stops
//! with an error that says which file to pass, and the exit code of the side
//! that failed.

use std::path::{Path, PathBuf};
use std::process::Output;

use ferry_proto::etcd::etcdserverpb::PutRequest;
use ferry_proto::etcd::etcdserverpb::kv_client::KvClient;
use ferry_tests::etcd::{EtcdOptions, EtcdServer, EtcdServerTls};
use ferry_tests::plane::{FerryKeys, dump, ferry};
use ferry_tests::tls::write_test_pki;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// The PEM files of one test's little PKI.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// A CA, a member certificate for 127.0.0.1 and a client certificate,
    /// both signed by the CA.
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        write_test_pki(dir.path());
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    /// A member serving clients over TLS only; with `client_cert_auth` it
    /// also demands a client certificate signed by the CA.
    fn server(&self, client_cert_auth: bool) -> EtcdServer {
        EtcdServer::start_with(&EtcdOptions {
            tls: Some(EtcdServerTls {
                cert_file: self.path("server.pem"),
                key_file: self.path("server-key.pem"),
                trusted_ca_file: client_cert_auth.then(|| self.path("ca.pem")),
                client_cert_auth,
            }),
            ..EtcdOptions::default()
        })
        .expect("etcd with TLS")
    }

    /// The test's own client, with the CA and the client certificate.
    async fn kv(&self, server: &EtcdServer) -> KvClient<Channel> {
        let read = |name: &str| std::fs::read(self.path(name)).expect("PEM read");
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca.pem")))
            .identity(Identity::from_pem(
                read("client.pem"),
                read("client-key.pem"),
            ));
        let channel = Channel::from_shared(format!("https://{}", server.endpoint()))
            .expect("endpoint")
            .tls_config(tls)
            .expect("tls config")
            .connect()
            .await
            .expect("the test's client connects over TLS");
        KvClient::new(channel)
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn store_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extract_and_restore_over_tls_and_clear_errors_without_the_right_files() {
    let pki = Pki::new();
    // The source demands a client certificate; the target only serves TLS.
    let source = pki.server(true);
    let target = pki.server(false);
    let mut source_kv = pki.kv(&source).await;
    for index in 0..300u32 {
        source_kv
            .put(PutRequest {
                key: format!("/app/{index:04}").into_bytes(),
                value: index.to_be_bytes().repeat(50),
                ..PutRequest::default()
            })
            .await
            .expect("put over TLS");
    }
    let store = tempfile::tempdir().expect("temp dir");
    let store = store_url(store.path());
    let (ca, cert, key) = (
        pki.arg("ca.pem"),
        pki.arg("client.pem"),
        pki.arg("client-key.pem"),
    );

    // Plain etcd:// to a member that speaks TLS only.
    let plain = ferry(&["extract", "--source", &source.url(), "--to", &store]);
    assert_eq!(plain.status.code(), Some(5), "{}", stderr(&plain));
    assert!(
        stderr(&plain).contains(&source.endpoint()) && stderr(&plain).contains("etcds://"),
        "{}",
        stderr(&plain)
    );

    // TLS, but the member's certificate is signed by a CA the system does
    // not trust.
    let no_ca = ferry(&[
        "extract",
        "--source",
        &format!("etcds://{}", source.endpoint()),
        "--to",
        &store,
        "--etcd-cert-file",
        &cert,
        "--etcd-key-file",
        &key,
    ]);
    assert_eq!(no_ca.status.code(), Some(5), "{}", stderr(&no_ca));
    assert!(
        stderr(&no_ca).contains("not trusted") && stderr(&no_ca).contains("--etcd-ca-file"),
        "{}",
        stderr(&no_ca)
    );

    // The CA, but no client certificate for a member that demands one.
    let no_client_cert = ferry(&[
        "extract",
        "--source",
        &source.url(),
        "--to",
        &store,
        "--etcd-ca-file",
        &ca,
    ]);
    assert_eq!(
        no_client_cert.status.code(),
        Some(5),
        "{}",
        stderr(&no_client_cert)
    );
    assert!(
        stderr(&no_client_cert).contains("client certificate")
            && stderr(&no_client_cert).contains("--etcd-cert-file"),
        "{}",
        stderr(&no_client_cert)
    );

    // A certificate without its key is a usage error.
    let half = ferry(&[
        "extract",
        "--source",
        &source.url(),
        "--to",
        &store,
        "--etcd-cert-file",
        &cert,
    ]);
    assert_eq!(half.status.code(), Some(2), "{}", stderr(&half));

    // With the right files, a round trip.
    let extracted = ferry(&[
        "extract",
        "--source",
        &source.url(),
        "--prefix",
        "/app/",
        "--to",
        &store,
        "--etcd-ca-file",
        &ca,
        "--etcd-cert-file",
        &cert,
        "--etcd-key-file",
        &key,
        "--quiet",
    ]);
    assert!(extracted.status.success(), "{}", stderr(&extracted));

    // Restoring without the CA fails on the target's side, before writing.
    let untrusted = ferry(&[
        "restore",
        "--from",
        &store,
        "--target",
        &format!("etcds://{}", target.endpoint()),
    ]);
    assert_eq!(untrusted.status.code(), Some(6), "{}", stderr(&untrusted));
    assert!(
        stderr(&untrusted).contains("not trusted"),
        "{}",
        stderr(&untrusted)
    );
    let target_kv = pki.kv(&target).await;
    assert!(
        dump(&target_kv, b"/app/", FerryKeys::Included)
            .await
            .is_empty()
    );

    let restored = ferry(&[
        "restore",
        "--from",
        &store,
        "--target",
        &target.url(),
        "--etcd-ca-file",
        &ca,
        "--quiet",
    ]);
    assert!(restored.status.success(), "{}", stderr(&restored));
    let expected = dump(&source_kv, b"/app/", FerryKeys::Included).await;
    let got = dump(&target_kv, b"/app/", FerryKeys::Included).await;
    assert_eq!(expected.len(), 300);
    assert_eq!(expected.len(), got.len());
    for (expected, got) in expected.iter().zip(&got) {
        assert_eq!(
            (&expected.key, &expected.value),
            (&got.key, &got.value),
            "the same key and value"
        );
        assert_eq!(got.version, 1, "written once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_run_in_place_over_tls_with_a_client_certificate() {
    let pki = Pki::new();
    let target = pki.server(true);
    let mut kv = pki.kv(&target).await;
    kv.put(PutRequest {
        key: b"/mystic/pipelines/Alpha".to_vec(),
        value: br#"{"name":"Alpha","environment":"gpu"}"#.to_vec(),
        ..PutRequest::default()
    })
    .await
    .expect("put over TLS");
    let profile = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("examples")
        .join("profiles")
        .join("mystic")
        .display()
        .to_string();
    let (ca, cert, key) = (
        pki.arg("ca.pem"),
        pki.arg("client.pem"),
        pki.arg("client-key.pem"),
    );
    let tls = [
        "--etcd-ca-file",
        ca.as_str(),
        "--etcd-cert-file",
        cert.as_str(),
        "--etcd-key-file",
        key.as_str(),
    ];
    let url = target.url();
    let run = |command: &str, with_tls: bool| {
        let mut args = vec!["migrations", command, "--target", &url, "--dir", &profile];
        if with_tls {
            args.extend(tls);
        }
        ferry(&args)
    };

    let no_certificate = run("status", false);
    assert!(!no_certificate.status.success());
    assert!(
        stderr(&no_certificate).contains("--etcd-ca-file"),
        "{}",
        stderr(&no_certificate)
    );
    let pending = run("status", true);
    assert_eq!(
        pending.status.code(),
        Some(10),
        "not up to date: {}",
        stderr(&pending)
    );
    let up = run("up", true);
    assert!(up.status.success(), "{}", stderr(&up));
    let done = run("status", true);
    assert!(done.status.success(), "up to date: {}", stderr(&done));
    let pipelines = dump(&kv, b"/mystic/pipelines/", FerryKeys::Included).await;
    assert_eq!(pipelines.len(), 1, "migrated in place");
    assert_eq!(pipelines[0].key, b"/mystic/pipelines/alpha");
    assert_eq!(pipelines[0].value, br#"{"name":"alpha"}"#);
}
